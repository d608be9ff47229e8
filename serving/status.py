"""One table from errors to gRPC status codes, applied to every RPC by `StatusInterceptor`.

Errors of `serving.errors` become their codes, with google.rpc details where a client can act on them
(BadRequest field violations, RetryInfo). Anything else becomes INTERNAL with a generic message; the
traceback goes to the log only. The interceptor also counts and times every RPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from serving import errors
from serving.metrics import RPC_DURATION, RPC_REQUESTS

log = logging.getLogger(__name__)

STATUS_TABLE: dict[type[errors.ScriptreelError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.NonFiniteOutput: grpc.StatusCode.INTERNAL,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
GENERIC_INTERNAL = "internal error; the server logged the details"


def to_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status a client receives for an exception."""
    if isinstance(exc, errors.UpstreamError):
        code = grpc.StatusCode[exc.code_name]
        upstream = status_pb2.Status(code=code.value[0], message=exc.message)
        upstream.details.extend(exc.details)
        return upstream
    for kind, code in STATUS_TABLE.items():
        if isinstance(exc, kind):
            status = status_pb2.Status(code=code.value[0], message=exc.message)  # type: ignore[attr-defined]
            for detail in _details(exc):
                packed = any_pb2.Any()
                packed.Pack(detail)
                status.details.append(packed)
            return status
    return status_pb2.Status(code=code_pb2.INTERNAL, message=GENERIC_INTERNAL)


def _details(exc: BaseException) -> list[Any]:
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        bad = error_details_pb2.BadRequest()
        for v in exc.violations:
            bad.field_violations.add(field=v.field, description=v.description)
        return [bad]
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]
    return []


def _code_name(status: status_pb2.Status) -> str:
    return grpc.StatusCode(_code_tuple(status.code)).name


def _code_tuple(value: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses and records RPC metrics, for unary and server-streaming RPCs.

    Args:
        refuse: Called before each RPC; returns an exception to answer with instead of running it
            (for draining and authentication), or None.
    """

    def __init__(self, refuse: Callable[[str, grpc.aio.ServicerContext], BaseException | None] | None = None):
        self._refuse = refuse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the handler of a unary-unary or unary-stream method."""
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method_path.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        service, _, method = method_path.lstrip("/").rpartition("/")
        service = service.rsplit(".", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method, method_path),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method, method_path),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, inner: Any, service: str, method: str, path: str) -> Any:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._handled(context, service, method, path, request):
                return await inner(request, context)

        return behavior

    def _wrap_stream(self, inner: Any, service: str, method: str, path: str) -> Any:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._handled(context, service, method, path, request):
                async for message in inner(request, context):
                    yield message

        return behavior

    @contextlib.asynccontextmanager
    async def _handled(
        self, context: grpc.aio.ServicerContext, service: str, method: str, path: str, request: Any
    ) -> AsyncIterator[None]:
        """Run one RPC: refusals first, then the handler; map its exception; count and time it."""
        start, code = time.perf_counter(), "OK"
        try:
            self._check(path, context)
            if isinstance(request, _Unparsable):
                raise errors.InvalidArgument(f"the request is not a valid message: {request.reason}")
            yield
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            code = getattr(context.code(), "name", "UNKNOWN")
            raise
        except Exception as exc:
            status = _status_for(exc, path)
            code = _code_name(status)
            await context.abort_with_status(rpc_status.to_status(status))
        finally:
            _observe(service, method, code, start)

    def _check(self, path: str, context: grpc.aio.ServicerContext) -> None:
        if self._refuse is not None:
            refusal = self._refuse(path, context)
            if refusal is not None:
                raise refusal


class _Unparsable:
    """A request body that is not a valid message of the method's type."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so a malformed body reaches the handler as `_Unparsable`.

    gRPC answers a body that fails to parse with UNKNOWN and the parser's exception text; it is bad
    input, so the interceptor answers INVALID_ARGUMENT instead.
    """
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError: corrupt wire format, invalid UTF-8 in a string
            return _Unparsable(str(exc))

    return parse


def _status_for(exc: Exception, path: str) -> status_pb2.Status:
    """The status for `exc`, logging unexpected errors with their traceback."""
    status = to_status(exc)
    if status.code == code_pb2.INTERNAL and not isinstance(exc, errors.ScriptreelError):
        log.exception("unexpected error in %s", path, exc_info=exc)
    elif status.code == code_pb2.INTERNAL:
        log.error("%s failed: %s", path, exc)
    return status


def _observe(service: str, method: str, code: str, start: float) -> None:
    RPC_REQUESTS.labels(service, method, code).inc()
    RPC_DURATION.labels(service, method).observe(time.perf_counter() - start)
