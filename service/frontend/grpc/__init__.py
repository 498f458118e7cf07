"""The gRPC door: V2's GRPCInferenceService, convserve's Introspection, grpc.health.v1 and
reflection, on grpc.aio. Runs in each front-end; calls the core, never the HTTP door."""
