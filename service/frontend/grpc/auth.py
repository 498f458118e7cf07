"""Bearer-token authentication over gRPC: with a token set, every RPC but health checks needs
`authorization: Bearer <token>` (the rule is `rules.BearerToken`'s, as at every door). A refusal is
recorded like any outcome."""

from __future__ import annotations

import grpc

from ...errors import Code
from ...rules import BearerToken
from ..observe import Outcome, Recorder

_HANDLER_KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, recorder: Recorder) -> None:
        self._token = BearerToken(token)
        self._recorder = recorder

    async def intercept_service(self, continuation, handler_call_details):
        method_path = handler_call_details.method
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if self._token.admits_call(method_path, presented):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = method_path.rsplit("/", 1)[-1]
        recorder = self._recorder

        async def deny(request_or_iterator, context):
            recorder.record(Outcome(method, code=Code.UNAUTHENTICATED))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token")

        async def deny_stream(request_or_iterator, context):
            await deny(request_or_iterator, context)
            yield  # pragma: no cover - abort raises first

        for kind, make in _HANDLER_KINDS.items():
            if getattr(handler, kind) is not None:
                return make(
                    deny_stream if kind.endswith("_stream") else deny,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
