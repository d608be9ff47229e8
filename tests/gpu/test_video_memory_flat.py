"""On a GPU: the video engine's memory stays flat over 20 consecutive requests of mixed sizes (issue 5).

The engines run in this process on the tiny SVD (image-to-video) and CogVideoX (text-to-video)
pipelines. After every request the allocated memory must be back where the first request left it (the loaded
engine plus one-time workspaces), and the allocator's cached memory must stay within the monitor's
policy (release_cache_above).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from media.keyframe import render_keyframe
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.params import Result, VideoParams
from vram.plan import Policy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
MiB = 2**20
# (width, height, frames, steps) per pipeline: sizes that change every latent and activation shape
# (CogVideoX takes 8k + 1 frames).
SIZES = {
    "svd": [(64, 64, 4, 2), (128, 96, 8, 3), (96, 64, 6, 2), (128, 128, 4, 2), (64, 96, 10, 3)],
    "t2v": [(64, 64, 9, 2), (128, 96, 17, 3), (96, 64, 9, 2), (128, 128, 1, 2), (64, 96, 17, 3)],
}


@pytest.mark.parametrize(("folder", "precision"), [("svd", "fp16"), ("t2v", "fp16"), ("svd", "fp8")])
def test_memory_stays_flat_over_20_requests_of_mixed_sizes(
    models_dir: Path, folder: str, precision: str
) -> None:
    # Earlier tests in this process (tests/gpu/test_gemv.py's weights and graphs) can leave segments
    # that still hold a live block, which no release frees: the policy is checked above them.
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    engine = VideoEngine.load(
        VideoEngineConfig(
            models_dir / folder,
            device="cuda",
            policy=Policy(precision=precision, allow_fallback=False),
            release_cache_above=64 * MiB,
        )
    )
    try:
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        after: list[int] = []
        for i in range(20):
            width, height, frames, steps = SIZES[folder][i % len(SIZES[folder])]
            fields = (
                {"image": render_keyframe("a bike", width, height, seed=i)}
                if folder == "svd"
                else {"prompt": "a mountain bike on a forest trail"}
            )
            params = engine.validate(
                VideoParams(
                    width=width, height=height, num_frames=frames, num_inference_steps=steps, seed=i, **fields
                )
            )
            events = list(engine.generate(params, lambda: False))
            assert isinstance(events[-1], Result) and events[-1].size_bytes > 0
            torch.cuda.synchronize()
            after.append(torch.cuda.memory_allocated())
            # The monitor empties the cache above 64 MiB; segments that still hold a live block stay.
            cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated() - held
            assert cached <= 64 * MiB + 32 * MiB, (i, cached / MiB, held / MiB)
        # Once, at the first request: cuBLAS's workspace for the rendering thread (32 MiB on Hopper; an
        # H200 run measured 33 MiB after every one of the 20 requests of the tiny SVD in FP16).
        assert after[0] - loaded <= 64 * MiB, (after[0] - loaded) / MiB
        assert max(after) - after[0] <= 2 * MiB, [(a - loaded) / MiB for a in after]  # no growth after it
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
