"""The `compile` setting on the tiny SVD and CogVideoX pipelines, on CPU.

Dynamo runs for real (tracing, guards, recompiles); the backend is "eager", which runs the captured
graphs without generating code: inductor takes about 80 s to compile the tiny SVD on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from media.keyframe import render_keyframe
from video_server import pipelines
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.params import Result, VideoParams
from video_server.pipelines import compile_modules, is_compiled, render
from vram.plan import Policy


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipelines, "COMPILE_BACKEND", "eager")


def load(model_dir: Path, policy: Policy | None = None, **kwargs: Any) -> VideoEngine:
    return VideoEngine.load(VideoEngineConfig(model_dir, device="cpu", policy=policy or Policy(), **kwargs))


def request(engine: VideoEngine, **fields: Any) -> VideoParams:
    """A validated request (the folder's defaults for what is not given) with a fixed seed."""
    if engine.modality == "image-to-video":
        fields.setdefault("image", render_keyframe("a mountain bike", 64, 64, seed=1))
    else:
        fields.setdefault("prompt", "a mountain bike on a forest trail")
    return engine.validate(VideoParams(seed=7, **fields))


def frames(engine: VideoEngine, params: VideoParams) -> np.ndarray:
    """The request's uint8 frames, before mp4 encoding (render raises on NaN/Inf)."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    with torch.inference_mode():
        return render(engine.pipe, engine.family, params, generator, engine.knobs, lambda *a: a[-1])


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("folder", ["svd", "t2v"])
def test_compiled_pipeline_renders_the_same_frames_and_compiles_at_load(
    models_dir: Path, folder: str
) -> None:
    plain = load(models_dir / folder)
    before = graphs()
    compiled = load(models_dir / folder, compile=True)
    assert is_compiled(compiled.pipe, compiled.family) and not is_compiled(plain.pipe, plain.family)
    assert compiled.pipe.vae.decoder._compiled_call_impl is not None
    assert graphs() > before  # the warm-up compiled at the default request size
    at_load = graphs()
    # The first request of the default size (through the server's path: thread, step hook) compiles nothing
    events = list(compiled.generate(request(compiled), lambda: False))
    assert isinstance(events[-1], Result) and graphs() == at_load
    params = request(compiled, num_inference_steps=2)
    ours, reference = frames(compiled, params), frames(plain, params)
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_compile_is_skipped_for_fp8_and_offload(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="video_server.pipelines"):
        fp8 = load(models_dir / "t2v", Policy(precision="fp8", allow_fallback=False), compile=True)
    assert fp8.plan.precision == "fp8" and not is_compiled(fp8.pipe, fp8.family)
    assert "compile skipped: fp8" in caplog.text
    assert isinstance(list(fp8.generate(request(fp8, num_inference_steps=1), lambda: False))[-1], Result)
    # Offload needs CUDA, so the plan is made up here; the pipeline is left as it was.
    plain = load(models_dir / "svd")
    offloaded = dataclasses.replace(plain.plan, offload="model")
    with caplog.at_level(logging.INFO, logger="video_server.pipelines"):
        assert compile_modules(plain.pipe, plain.family, offloaded) == []
    assert "compile skipped: the plan offloads (model)" in caplog.text
    assert not is_compiled(plain.pipe, plain.family)


def test_a_failing_compiler_leaves_the_plan_and_serves_uncompiled(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        raise RuntimeError("no C compiler for Triton")  # what a GPU image without gcc gives

    monkeypatch.setattr(pipelines, "COMPILE_BACKEND", broken)
    torch._dynamo.reset()
    policy = Policy(precision="fp32", allow_fallback=True)
    with caplog.at_level(logging.ERROR, logger="video_server.pipelines"):
        engine = load(models_dir / "svd", policy, compile=True)
    assert "compiling the pipeline failed; it runs uncompiled" in caplog.text
    assert engine.plan.precision == "fp32"  # not a precision fallback
    assert not is_compiled(engine.pipe, engine.family)
    events = list(engine.generate(request(engine, num_inference_steps=2), lambda: False))
    assert isinstance(events[-1], Result) and events[-1].size_bytes > 0
