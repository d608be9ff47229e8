"""VideoService: translates messages to engine calls and back. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scriptreel.video.v1 import video_service_pb2 as pb
from scriptreel.video.v1 import video_service_pb2_grpc as pb_grpc
from serving.convert import memory_pb, model_info_pb, plan_pb
from serving.model_main import EngineSlot
from serving.streams import Admission, iterate_in_thread
from video_server.engine import VideoEngine
from video_server.params import Chunk, Progress, Result, VideoEvent, VideoParams

MODALITY = {"image-to-video": pb.MODALITY_IMAGE_TO_VIDEO, "text-to-video": pb.MODALITY_TEXT_TO_VIDEO}


def event_pb(event: VideoEvent) -> pb.GenerateVideoResponse:
    """An engine event as a GenerateVideoResponse."""
    if isinstance(event, Progress):
        return pb.GenerateVideoResponse(
            progress=pb.Progress(stage=event.stage, step=event.step, total_steps=event.total_steps)
        )
    if isinstance(event, Chunk):
        return pb.GenerateVideoResponse(chunk=pb.VideoChunk(data=event.data))
    assert isinstance(event, Result)
    return pb.GenerateVideoResponse(
        result=pb.VideoResult(
            mime_type=event.mime_type,
            num_frames=event.num_frames,
            width=event.width,
            height=event.height,
            fps=event.fps,
            sha256=event.sha256,
            memory=memory_pb(event.memory),
            duration_seconds=event.duration_seconds,
            size_bytes=event.size_bytes,
        )
    )


class VideoServicer(pb_grpc.VideoServiceServicer):
    """The video server's RPCs."""

    def __init__(self, slot: EngineSlot[VideoEngine], admission: Admission) -> None:
        self.slot = slot
        self.admission = admission

    async def GenerateVideo(
        self, request: pb.GenerateVideoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateVideoResponse]:
        """Stream progress, then the mp4 in chunks, then the result."""
        engine = self.slot.get()
        params = engine.validate(
            VideoParams(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                image=request.image,
                width=request.width,
                height=request.height,
                num_frames=request.num_frames,
                fps=request.fps,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                seed=request.seed,
            )
        )
        with self.admission.slot():
            async for event in iterate_in_thread(lambda should_stop: engine.generate(params, should_stop)):
                yield event_pb(event)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """Describe the pipeline, its modality, plan, memory, defaults and limits."""
        engine = self.slot.get()
        d, lim, k = engine.defaults, engine.limits, engine.knobs
        plan = plan_pb(engine.plan, k.decode_chunk_size, k.forward_chunking, k.vae_tiling, k.split_guidance)
        return pb.GetModelInfoResponse(
            info=model_info_pb(engine, plan),
            modality=MODALITY[engine.modality],
            default_width=d.width,
            default_height=d.height,
            default_num_frames=d.num_frames,
            default_fps=d.fps,
            default_num_inference_steps=d.num_inference_steps,
            size_multiple=lim.size_multiple,
            max_width=lim.max_width,
            max_height=lim.max_height,
            max_num_frames=lim.max_num_frames,
        )
