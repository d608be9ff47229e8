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
from diffusers import UNetSpatioTemporalConditionModel
from torch._dynamo.utils import counters

from media.keyframe import render_keyframe
from video_server import fp8, pipelines
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.params import Result, VideoParams
from video_server.pipelines import compile_modules, is_compiled, render, torch_components
from vram import apply
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
    assert_serves_as_uncompiled(compiled, plain)


def assert_serves_as_uncompiled(compiled: VideoEngine, plain: VideoEngine) -> None:
    """The compiled engine serves as `plain` does, compiling nothing more.

    Its first request of the default size (the server's path: thread, step hook) compiles nothing, and
    a request renders what the uncompiled engine renders (within one level).
    """
    at_load = graphs()
    events = list(compiled.generate(request(compiled), lambda: False))
    assert isinstance(events[-1], Result) and graphs() == at_load
    params = request(compiled, num_inference_steps=2)
    ours, reference = frames(compiled, params), frames(plain, params)
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def weights(engine: VideoEngine) -> tuple[int, set[torch.dtype]]:
    """The bytes of the pipeline's weights, and the dtypes of its denoiser's parameters."""
    denoiser = getattr(engine.pipe, engine.family.denoiser)
    return apply.weights_bytes(list(torch_components(engine.pipe).values())), {
        p.dtype for p in denoiser.parameters()
    }


def breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("folder", ["svd", "t2v"])
def test_an_fp8_plan_compiles_and_renders_the_frames_it_renders_uncompiled(
    models_dir: Path, folder: str
) -> None:
    torch._dynamo.reset()  # each engine's modules are new to Dynamo's guards: fresh recompile limits
    policy = Policy(precision="fp8", allow_fallback=False)
    knobs = {"forward_chunking": True, "split_guidance": True} if folder == "svd" else {}  # the 6 GiB plan's
    plain = load(models_dir / folder, policy, **knobs)
    before, broken = graphs(), breaks()
    compiled = load(models_dir / folder, policy, compile=True, **knobs)
    assert compiled.plan.precision == "fp8" and is_compiled(compiled.pipe, compiled.family)
    assert graphs() > before and breaks() == broken  # compiled at load, without a graph break
    stored = weights(compiled)
    assert fp8.FP8 in stored[1] and stored == weights(plain)  # the same FP8 leaves, the same bytes
    assert compiled.plan.predicted_peak_bytes == plain.plan.predicted_peak_bytes
    assert_serves_as_uncompiled(compiled, plain)
    assert weights(compiled) == stored  # no copy left behind, nothing cast in place


def test_split_guidance_compiles_one_graph_that_both_halves_run(models_dir: Path) -> None:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 3, 8, 8, 8, generator=g),  # guidance's batch of two, 3 frames
        "timestep": 10.0,
        "encoder_hidden_states": torch.randn(2, 1, 32, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2),
    }

    def compiled(split: bool) -> tuple[int, int, torch.Tensor]:
        """New graphs and the calls captured in them, and the output, of one compiled UNet call."""
        unet = UNetSpatioTemporalConditionModel.from_pretrained(models_dir / "svd" / "unet")
        if split:
            pipelines.run_in_halves(unet)
        unet.compile(backend="eager", dynamic=False)
        torch._dynamo.reset()
        before, calls = graphs(), counters["stats"]["calls_captured"]
        with torch.inference_mode():
            out = unet(**inputs).sample
        return graphs() - before, counters["stats"]["calls_captured"] - calls, out

    graphs_whole, calls_whole, whole = compiled(split=False)
    graphs_split, calls_split, split = compiled(split=True)
    assert graphs_whole == graphs_split == 1
    assert calls_split == calls_whole  # a graph of one pass, run twice: not two passes traced into one
    torch.testing.assert_close(split, whole)


def test_compile_is_skipped_for_block_cast_fp8_and_offload(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Stored for an eager pipeline (cast per block), FP8 is not compiled after the fact.
    block = load(models_dir / "t2v", Policy(precision="fp8", allow_fallback=False))
    with caplog.at_level(logging.INFO, logger="video_server.pipelines"):
        assert compile_modules(block.pipe, block.family, block.plan) == []
    assert "compile skipped: fp8 weights are cast per block" in caplog.text
    assert not is_compiled(block.pipe, block.family)
    # Offload needs CUDA, so the plan is made up here; the pipeline is left as it was.
    plain = load(models_dir / "svd")
    offloaded = dataclasses.replace(plain.plan, offload="model")
    with caplog.at_level(logging.INFO, logger="video_server.pipelines"):
        assert compile_modules(plain.pipe, plain.family, offloaded) == []
    assert "compile skipped: the plan offloads (model)" in caplog.text
    assert not is_compiled(plain.pipe, plain.family)


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_a_failing_compiler_leaves_the_plan_and_serves_uncompiled(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, precision: str
) -> None:
    def broken(graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        raise RuntimeError("no C compiler for Triton")  # what a GPU image without gcc gives

    monkeypatch.setattr(pipelines, "COMPILE_BACKEND", broken)
    torch._dynamo.reset()
    policy = Policy(precision=precision, allow_fallback=True)
    with caplog.at_level(logging.ERROR, logger="video_server.pipelines"):
        engine = load(models_dir / "svd", policy, compile=True)
    assert "compiling the pipeline failed; it runs uncompiled" in caplog.text
    assert engine.plan.precision == precision  # not a precision fallback
    assert not is_compiled(engine.pipe, engine.family)
    events = list(engine.generate(request(engine, num_inference_steps=2), lambda: False))
    assert isinstance(events[-1], Result) and events[-1].size_bytes > 0
    if precision == "fp8":  # stored for compiling (cast inline), it runs eagerly as block casting would
        assert fp8.traceable(engine.pipe.unet) and fp8.FP8 in weights(engine)[1]
        params = request(engine, num_inference_steps=2)
        reference = frames(load(models_dir / "svd", Policy(precision="fp8", allow_fallback=False)), params)
        assert np.array_equal(frames(engine, params), reference)
