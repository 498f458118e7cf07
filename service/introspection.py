"""convserve.v1.Introspection: a served model's arithmetic table and training provenance."""

from __future__ import annotations

import json

from .observe import Recorder
from .proto import introspection_pb2 as ipb
from .proto import introspection_pb2_grpc as ipb_grpc
from .registry import Registry
from .servicer import rpc


class IntrospectionServicer(ipb_grpc.IntrospectionServicer):
    def __init__(self, registry: Registry, recorder: Recorder) -> None:
        self.registry = registry
        self.recorder = recorder

    @rpc
    async def DescribeModel(self, request, context, outcome):
        model = self.registry.resolve(request.name, request.version)
        card = model.card
        arithmetic = card.arithmetic or {"layers": [], "total_params": 0, "total_macs": 0}
        response = ipb.DescribeModelResponse(
            name=model.name,
            version=str(model.version),
            total_params=arithmetic["total_params"],
            total_macs=arithmetic["total_macs"],
            feature_maps=card.feature_map_names,
            labels=card.labels,
            training_json=json.dumps(card.training),
            preprocess_json=json.dumps(card.preprocess.to_dict()),
            execution_provider=model.execution_provider,
            sha256=card.sha256,
        )
        for layer in arithmetic["layers"]:
            response.layers.add(
                name=layer["name"],
                kind=layer["kind"],
                op=layer["op"],
                input_shape=layer["input_shape"],
                output_shape=layer["output_shape"],
                params=layer["params"],
                macs=layer["macs"],
                activations=layer["activations"],
                receptive_field=layer["receptive_field"] or [],
                jump=layer["jump"] or [],
                detail=layer.get("detail", ""),
            )
        return response
