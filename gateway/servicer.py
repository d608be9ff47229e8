"""GatewayService: translates messages to pipeline calls and back. Nothing else."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from gateway.pipeline import Pipeline, script_pb
from gateway.script import validate_request
from gateway.upstreams import Upstreams
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from serving.streams import Admission


class GatewayServicer(gw_grpc.GatewayServiceServicer):
    """The gateway's RPCs."""

    def __init__(self, pipeline: Pipeline, upstreams: Upstreams, admission: Admission) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self.admission = admission

    async def WriteScript(
        self, request: gw.WriteScriptRequest, context: grpc.aio.ServicerContext
    ) -> gw.WriteScriptResponse:
        """Write a script for a brief."""
        script_request = validate_request(request.brief, request.num_scenes, request.style, request.language)
        with self.admission.slot():
            script, fallback, _ = await self.pipeline.write_script(script_request, _deadline(context))
        return gw.WriteScriptResponse(script=script_pb(script), fallback_used=fallback)

    async def CreateVideo(
        self, request: gw.CreateVideoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gw.CreateVideoResponse]:
        """Brief -> script -> clips -> one mp4, streamed."""
        script_request = validate_request(request.brief, request.num_scenes, request.style, request.language)
        with self.admission.slot():
            async for event in self.pipeline.create_video(
                script_request, request.image, request.video, _deadline(context)
            ):
                yield event

    async def GetStatus(
        self, request: gw.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> gw.GetStatusResponse:
        """Health and model info of every upstream."""
        return gw.GetStatusResponse(upstreams=await self.upstreams.status())


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
