"""The HTTP door: V2's HTTP/REST protocol (with Triton's binary tensors) and the page, on aiohttp.
Runs in each front-end; calls the core, never the gRPC door."""
