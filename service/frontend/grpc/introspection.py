"""convserve.v1.Introspection over gRPC: a served model's arithmetic table and training provenance,
and one convolution's kernels, from the core (which reads them from the model's card and folder)."""

from __future__ import annotations

from google.protobuf import json_format

from convserve.proto import introspection_pb2 as ipb
from convserve.proto import introspection_pb2_grpc as ipb_grpc

from ..core import FrontendCore
from .servicer import rpc


class IntrospectionServicer(ipb_grpc.IntrospectionServicer):
    def __init__(self, core: FrontendCore) -> None:
        self.core = core

    @rpc
    async def DescribeModel(self, request, context):
        described = self.core.describe_model(request.name, request.version)
        return json_format.ParseDict(described, ipb.DescribeModelResponse())

    @rpc
    async def LayerFilters(self, request, context):
        filters = await self.core.layer_filters(request.name, request.version, request.feature_map)
        return ipb.LayerFiltersResponse(**filters)
