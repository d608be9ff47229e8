"""`python -m video_server`: serve one diffusers video pipeline over gRPC."""

from __future__ import annotations

import asyncio
import sys

import grpc

from scriptreel.video.v1 import video_service_pb2, video_service_pb2_grpc
from serving.model_main import EngineSlot, configure_allocator, configure_logging, serve_model
from serving.settings import load_settings
from serving.streams import Admission
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.servicer import VideoServicer
from video_server.settings import VideoSettings
from vram.sizes import parse_bytes

SERVICE = video_service_pb2.DESCRIPTOR.services_by_name["VideoService"].full_name


def engine_config(settings: VideoSettings) -> VideoEngineConfig:
    """The engine's configuration from the server's settings."""
    return VideoEngineConfig(
        model_dir=settings.model_dir,
        device=settings.device,
        policy=settings.policy(offload=settings.offload, supports_offload=True),
        decode_chunk_size=settings.decode_chunk_size,
        forward_chunking=settings.forward_chunking,
        vae_tiling=settings.vae_tiling,
        split_guidance=settings.split_guidance,
        channels_last=settings.channels_last,
        compile=settings.compile,
        max_width=settings.max_width,
        max_height=settings.max_height,
        max_num_frames=settings.max_num_frames,
        max_steps=settings.max_steps,
        release_cache_above=parse_bytes(settings.release_cache_above) or 0,
        min_free=parse_bytes(settings.min_free) or 0,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    settings = load_settings(VideoSettings, argv if argv is not None else sys.argv[1:])
    configure_logging(settings.log_level)
    configure_allocator()
    config = engine_config(settings)

    def register(server: grpc.aio.Server) -> EngineSlot[VideoEngine]:
        slot: EngineSlot[VideoEngine] = EngineSlot("video")
        admission = Admission("video", settings.max_queue, retry_after_s=10.0)
        video_service_pb2_grpc.add_VideoServiceServicer_to_server(VideoServicer(slot, admission), server)
        return slot

    return asyncio.run(serve_model(settings, "video", [SERVICE], lambda: VideoEngine.load(config), register))


if __name__ == "__main__":
    sys.exit(main())
