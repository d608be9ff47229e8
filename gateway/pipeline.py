"""The gateway's work: brief -> script (LLM) -> one clip per scene (video) -> one mp4.

Events are the gateway contract's own messages; the servicer only passes them on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import Gauge, Histogram

from gateway.script import (
    SCRIPT_SCHEMA,
    ScriptRequest,
    ScriptText,
    fallback_script,
    parse_script,
    prompt_messages,
)
from gateway.settings import GatewaySettings
from gateway.upstreams import Upstreams
from media.keyframe import decode_image, render_keyframe
from media.mp4 import concat_mp4
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.llm.v1 import llm_service_pb2 as llm
from scriptreel.video.v1 import video_service_pb2 as video
from serving.errors import FieldViolation, collect

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MAX_IMAGE_BYTES = 8 << 20
MIN_SIZE = 16  # the video server's smallest width and height (before rounding up to its size multiple)
MIN_IMAGE_SIDE = 8  # the video server's smallest conditioning image side
JOIN_WORKERS = 2  # clips joined at once; more joins wait for a thread
INT64 = 1 << 64
STAGE_SECONDS = Histogram(
    "scriptreel_gateway_stage_seconds",
    "Time of each CreateVideo stage (script, scene, join).",
    ["stage"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200),
)
UPSTREAM_UP = Gauge(
    "scriptreel_gateway_upstream_up", "1 when the upstream answered its last call.", ["server"]
)


@dataclass
class _Clock:
    timings: list[gw.StageTiming] = field(default_factory=list)

    def record(self, stage: str, start: float) -> None:
        seconds = time.perf_counter() - start
        metric_stage = "scene" if stage.startswith("scene-") else stage
        STAGE_SECONDS.labels(metric_stage).observe(seconds)
        self.timings.append(gw.StageTiming(stage=stage, seconds=seconds))


class Pipeline:
    """Orchestrates the upstreams for WriteScript and CreateVideo. Call `close` when done."""

    def __init__(self, settings: GatewaySettings, upstreams: Upstreams) -> None:
        self.settings = settings
        self.upstreams = upstreams
        # Joining clips is CPU work (PyAV): a pool of its own bounds its threads, whatever else the
        # event loop's default executor serves.
        self._joins = ThreadPoolExecutor(max_workers=JOIN_WORKERS, thread_name_prefix="mp4-join")

    def close(self) -> None:
        """Stop the join threads (after the server has drained)."""
        self._joins.shutdown(wait=True)

    async def write_script(
        self, request: ScriptRequest, deadline: float | None = None
    ) -> tuple[ScriptText, bool, llm.GenerateResponse]:
        """Ask the LLM for a script; returns (script, fallback_used, the LLM's last message).

        `deadline` (time.monotonic()) bounds every upstream call, so none outlives the client's.
        """
        messages = [llm.ChatMessage(role=r, content=c) for r, c in prompt_messages(request)]
        text, last = await self.upstreams.generate_text(
            llm.GenerateRequest(
                messages=messages,
                max_new_tokens=self.settings.script_max_new_tokens,
                temperature=self.settings.script_temperature,
                top_p=0.95,
                json_schema=json.dumps(SCRIPT_SCHEMA),
            ),
            deadline,
        )
        UPSTREAM_UP.labels("llm").set(1)
        script = parse_script(text, request)
        if script is None:
            log.info("LLM output held no usable script (%d chars); using the fallback", len(text))
            return fallback_script(request), True, last
        return script, False, last

    async def create_video(
        self, request: ScriptRequest, image: bytes, params: gw.VideoParameters, deadline: float | None = None
    ) -> AsyncIterator[gw.CreateVideoResponse]:
        """Write the script, render each scene, join the clips; yields the contract's events."""
        info = await self.upstreams.video_info()
        UPSTREAM_UP.labels("video").set(1)
        _validate_video(params, image, info)
        clock = _Clock()

        start = time.perf_counter()
        script, fallback, llm_last = await self.write_script(request, deadline)
        clock.record("script", start)
        yield gw.CreateVideoResponse(script=script_pb(script))

        clips: list[bytes] = []
        last_result = video.VideoResult()
        total_frames = 0
        image_to_video = info.modality == video.MODALITY_IMAGE_TO_VIDEO
        for scene in script.scenes:
            start = time.perf_counter()
            scene_request = _scene_request(
                scene.visual_prompt, scene.index, image, params, info, image_to_video
            )
            clip = bytearray()
            async for event in self.upstreams.generate_video(scene_request, deadline):
                kind = event.WhichOneof("event")
                if kind == "progress":
                    p = event.progress
                    yield gw.CreateVideoResponse(
                        progress=gw.SceneProgress(
                            scene=scene.index, step=p.step, total_steps=p.total_steps, stage=p.stage
                        )
                    )
                elif kind == "chunk":
                    clip += event.chunk.data
                elif kind == "result":
                    last_result = event.result
                    total_frames += event.result.num_frames
            clips.append(bytes(clip))
            clock.record(f"scene-{scene.index}", start)

        start = time.perf_counter()
        fps = last_result.fps or info.default_fps or 8
        yield gw.CreateVideoResponse(progress=gw.SceneProgress(scene=len(clips), stage="join"))
        movie = await asyncio.get_running_loop().run_in_executor(self._joins, concat_mp4, clips, fps)
        clock.record("join", start)
        for offset in range(0, len(movie), CHUNK_BYTES):
            yield gw.CreateVideoResponse(chunk=gw.VideoChunk(data=movie[offset : offset + CHUNK_BYTES]))
        yield gw.CreateVideoResponse(
            summary=gw.CreateVideoSummary(
                timings=clock.timings,
                upstreams=[
                    gw.UpstreamUsage(server="llm", memory=llm_last.memory),
                    gw.UpstreamUsage(server="video", memory=last_result.memory, plan=info.info.plan),
                ],
                mime_type="video/mp4",
                num_frames=total_frames,
                width=last_result.width,
                height=last_result.height,
                fps=fps,
                sha256=hashlib.sha256(movie).hexdigest(),
                size_bytes=len(movie),
                script_fallback_used=fallback,
            )
        )


def script_pb(script: ScriptText) -> gw.Script:
    """ScriptText -> Script message."""
    return gw.Script(
        title=script.title,
        scenes=[
            gw.Scene(
                index=s.index,
                narration=s.narration,
                visual_prompt=s.visual_prompt,
                duration_seconds=s.duration_seconds,
            )
            for s in script.scenes
        ],
    )


def _validate_video(params: gw.VideoParameters, image: bytes, info: video.GetModelInfoResponse) -> None:
    """Check the video parameters against the video server's limits before any work starts."""
    violations = []
    multiple = info.size_multiple or 8
    minimum = -(-MIN_SIZE // multiple) * multiple
    for name, value, limit in (
        ("video.width", params.width, info.max_width),
        ("video.height", params.height, info.max_height),
    ):
        if value < 0 or value % multiple or (limit and value > limit) or 0 < value < minimum:
            violations.append(
                FieldViolation(
                    name, f"must be a multiple of {multiple} from {minimum} to {limit} (0: default)"
                )
            )
    if params.num_frames < 0 or (info.max_num_frames and params.num_frames > info.max_num_frames):
        violations.append(FieldViolation("video.num_frames", f"must be 0 to {info.max_num_frames}"))
    if not 0 <= params.fps <= 60:
        violations.append(FieldViolation("video.fps", "must be 0 to 60"))
    if not 0 <= params.num_inference_steps <= 200:
        violations.append(FieldViolation("video.num_inference_steps", "must be 0 to 200"))
    if image:
        try:
            decoded = decode_image(image, MAX_IMAGE_BYTES)
            if min(decoded.size) < MIN_IMAGE_SIDE:
                violations.append(FieldViolation("image", f"must be at least {MIN_IMAGE_SIDE} pixels a side"))
        except Exception as exc:
            violations.append(FieldViolation("image", str(getattr(exc, "message", exc))))
    collect(violations)


def _scene_request(
    visual_prompt: str,
    index: int,
    image: bytes,
    params: gw.VideoParameters,
    info: video.GetModelInfoResponse,
    image_to_video: bool,
) -> video.GenerateVideoRequest:
    width = params.width or info.default_width
    height = params.height or info.default_height
    request = video.GenerateVideoRequest(
        prompt=visual_prompt,
        width=width,
        height=height,
        num_frames=params.num_frames,
        fps=params.fps,
        num_inference_steps=params.num_inference_steps,
        seed=_scene_seed(params.seed, index),
    )
    if image_to_video:
        request.image = image or render_keyframe(visual_prompt, width, height, seed=params.seed + index)
    return request


def _scene_seed(seed: int, index: int) -> int:
    """The seed of one scene: seed + index, wrapped into int64 (0 stays 0: "pick one")."""
    if not seed:
        return 0
    return (seed + index + INT64 // 2) % INT64 - INT64 // 2
