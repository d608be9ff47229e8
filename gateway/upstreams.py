"""Channels to the LLM and video servers: balancing, retries, deadlines and error translation."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.settings import GatewaySettings
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.llm.v1 import llm_service_pb2 as llm
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2 as video
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc
from serving import errors
from serving.tls import channel_credentials

# Retry only what is safe: UNAVAILABLE means the call never reached a model (connection refused,
# replica draining). gRPC retries a streaming call only until its first response arrives.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
CHANNEL_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 16 * 2**20),
    # Reconnect fast after an upstream restarts (the default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
}


class Upstreams:
    """The gateway's clients of the LLM and video servers."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        creds = channel_credentials(settings.upstream_ca, settings.upstream_cert, settings.upstream_key)
        self.targets = {"llm": settings.llm_target, "video": settings.video_target}
        self.channels = {name: _channel(target, creds) for name, target in self.targets.items()}
        self.llm = llm_grpc.LlmServiceStub(self.channels["llm"])
        self.video = video_grpc.VideoServiceStub(self.channels["video"])

    async def close(self) -> None:
        """Close both channels."""
        for channel in self.channels.values():
            await channel.close()

    async def video_info(self) -> video.GetModelInfoResponse:
        """The video server's model info (modality, defaults and limits)."""
        with translated("video"):
            return await self.video.GetModelInfo(
                video.GetModelInfoRequest(), timeout=self.settings.status_timeout_seconds
            )

    async def generate_text(
        self, request: llm.GenerateRequest, deadline: float | None = None
    ) -> tuple[str, llm.GenerateResponse]:
        """Run Generate to the end; returns the text and the last message (usage, memory).

        `deadline` (time.monotonic()) is the gateway's own client's: upstream calls never outlive it.
        """
        parts, last = [], llm.GenerateResponse()
        timeout = _timeout(self.settings.script_timeout_seconds, deadline)
        with translated("llm"):
            async for message in self.llm.Generate(request, timeout=timeout):
                parts.append(message.text)
                last = message
        return "".join(parts), last

    async def generate_video(
        self, request: video.GenerateVideoRequest, deadline: float | None = None
    ) -> AsyncIterator[video.GenerateVideoResponse]:
        """Stream GenerateVideo; cancelling the iteration cancels the upstream call."""
        call = self.video.GenerateVideo(
            request, timeout=_timeout(self.settings.scene_timeout_seconds, deadline)
        )
        try:
            with translated("video"):
                async for message in call:
                    yield message
        finally:
            call.cancel()

    async def status(self) -> list[gw.UpstreamStatus]:
        """Health and model info of each upstream; unreachable ones say so."""
        result = []
        for name in ("llm", "video"):
            entry = gw.UpstreamStatus(server=name, target=self.targets[name])
            try:
                entry.health = await self._health(name)
                stub = self.llm if name == "llm" else self.video
                request = llm.GetModelInfoRequest() if name == "llm" else video.GetModelInfoRequest()
                info = await stub.GetModelInfo(request, timeout=self.settings.status_timeout_seconds)
                entry.info.CopyFrom(info.info)
            except grpc.aio.AioRpcError as exc:
                entry.health = entry.health or "UNREACHABLE"
                entry.error = f"{exc.code().name}: {exc.details()}"
            result.append(entry)
        return result

    async def _health(self, name: str) -> str:
        stub = health_pb2_grpc.HealthStub(self.channels[name])
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(), timeout=self.settings.status_timeout_seconds
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _timeout(default: float, deadline: float | None) -> float:
    """The upstream call's timeout: the setting, shortened to the caller's deadline."""
    if deadline is None:
        return default
    return max(0.001, min(default, deadline - time.monotonic()))


def _channel(target: str, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if creds is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)


@contextlib.contextmanager
def translated(server: str) -> Iterator[None]:
    """Turn an upstream's failure into a clear status for the gateway's client."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise errors.UpstreamError(
                f"{server} server unavailable: {exc.details()}", "UNAVAILABLE"
            ) from None
        if code in PASSED_THROUGH:
            raise errors.UpstreamError(
                f"{server} server: {exc.details()}", code.name, _status_details(exc)
            ) from None
        raise errors.UpstreamError(f"{server} server failed: {exc.details()}", "INTERNAL") from None


def _status_details(exc: grpc.aio.AioRpcError) -> list[Any]:
    """The google.rpc.Status details (BadRequest, RetryInfo) an upstream sent with its error."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return list(status_pb2.Status.FromString(value).details)
    return []
