"""The engine: one process per device that owns the models (registry, onnxruntime sessions, batchers,
statistics, lifecycle) and clients' shared-memory regions. Imports no gRPC servicer."""
