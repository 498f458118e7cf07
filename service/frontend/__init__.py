"""The front-ends: N processes that share the ports and do the wire work (gRPC, parsing, image
decoding, auth, TLS, building answers). They never load a model and never import onnxruntime."""
