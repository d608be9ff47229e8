"""The video engine on the tiny SVD and CogVideoX pipelines, on CPU: plans, progress, mp4s, validation."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY, generate_latest

from media.keyframe import render_keyframe
from media.mp4 import decode_mp4
from serving.errors import Cancelled, InvalidArgument, NonFiniteOutput
from tiny_models.video import build_svd, build_text_to_video
from video_server import engine as engine_module
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.families import COGVIDEOX, SVD, Family, resolve_limits
from video_server.footprint import ActivationModel, MemoryKnobs, component_sizes, predict_footprint
from video_server.params import Chunk, Progress, Result, VideoEvent, VideoParams
from video_server.pipelines import load_pipeline
from video_server.planning import resolve_knobs, video_policy
from vram import apply
from vram.plan import Footprint, Hardware, PlanError, Policy, PrecisionPlan, predict_peak, resolve_plan

PROMPT = "a red mountain bike on a rocky trail, golden hour"
REPO = Path(__file__).resolve().parents[2]
GiB = 2**30
H200 = Hardware("cuda:0", 141 * GiB, (9, 0), bf16=True)


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_svd(tmp_path_factory.mktemp("svd"))


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_to_video(tmp_path_factory.mktemp("t2v"))


def load(model_dir: Path, policy: Policy | None = None, **kwargs: Any) -> VideoEngine:
    return VideoEngine.load(VideoEngineConfig(model_dir, device="cpu", policy=policy or Policy(), **kwargs))


@pytest.fixture(scope="module")
def svd(svd_dir: Path) -> VideoEngine:
    return load(svd_dir)


@pytest.fixture(scope="module")
def t2v(t2v_dir: Path) -> VideoEngine:
    return load(t2v_dir)


@pytest.fixture(scope="module", params=["svd", "t2v"])
def engine(request: pytest.FixtureRequest) -> VideoEngine:
    return request.getfixturevalue(request.param)


def never() -> bool:
    return False


def params_for(engine: VideoEngine, **fields: Any) -> VideoParams:
    """A request with the conditioning its modality needs."""
    if engine.modality == "image-to-video":
        fields.setdefault("image", render_keyframe(PROMPT, 64, 64, seed=1))
    else:
        fields.setdefault("prompt", PROMPT)
    return VideoParams(**fields)


def run(
    engine: VideoEngine, params: VideoParams, should_stop: Callable[[], bool] = never
) -> list[VideoEvent]:
    return list(engine.generate(params, should_stop))


def video_of(events: list[VideoEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Chunk))


def decode(data: bytes) -> list[Any]:
    with av.open(io.BytesIO(data), mode="r") as container:
        assert container.streams.video[0].codec_context.name == "h264"
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- loading ------------------------------------------------------------------------------------------
def test_engines_describe_their_pipelines(svd: VideoEngine, t2v: VideoEngine) -> None:
    assert (svd.modality, svd.architecture) == ("image-to-video", "StableVideoDiffusionPipeline")
    assert (t2v.modality, t2v.architecture) == ("text-to-video", "CogVideoXPipeline")
    for engine in (svd, t2v):
        assert engine.plan.precision == "fp32" and engine.plan.offload == "none"  # auto on a CPU
        components = list(engine.pipe.components.values())
        modules = [m for m in components if isinstance(m, torch.nn.Module)]
        assert engine.monitor.weights_bytes == apply.weights_bytes(modules) > 0
        assert engine.parameter_count == apply.parameter_count(modules)
    # Defaults and limits come from the tiny folders' scriptreel.json and the pipelines' configs.
    assert (svd.defaults.width, svd.defaults.height, svd.defaults.num_frames, svd.defaults.fps) == (
        64,
        64,
        8,
        7,
    )
    assert (svd.limits.size_multiple, svd.limits.frame_multiple) == (8, 1)
    assert (t2v.defaults.num_frames, t2v.limits.size_multiple, t2v.limits.frame_multiple) == (9, 16, 8)
    assert "^vae$" not in svd.plan.keep_fp32 and "^vae$" not in t2v.plan.keep_fp32


def test_footprint_counts_parameters_exactly_before_loading(engine: VideoEngine) -> None:
    sizes = component_sizes(Path(engine.config.model_dir), engine.family)
    assert sizes.total_params == engine.footprint.params == engine.parameter_count
    assert engine.plan.predicted_peak_bytes > engine.monitor.weights_bytes


def test_real_folder_without_sidecar_gets_family_defaults(svd_dir: Path, tmp_path: Path) -> None:
    from video_server.families import SVD, resolve_limits

    folder = tmp_path / "svd"
    folder.mkdir()
    for item in svd_dir.iterdir():
        if item.name != "scriptreel.json":
            (folder / item.name).symlink_to(item)
    defaults, limits = resolve_limits(folder, SVD)
    assert (defaults.width, defaults.height, defaults.num_frames) == (1024, 576, 25)
    assert (defaults.num_inference_steps, defaults.fps) == (25, 7)
    assert (limits.max_width, limits.max_num_frames) == (1024, 25)


# -- generation ---------------------------------------------------------------------------------------
def test_generates_a_decodable_mp4_with_progress_per_step(engine: VideoEngine) -> None:
    steps_before = sample("scriptreel_video_steps_total")
    frames_before = sample("scriptreel_video_frames_total")
    events = run(engine, params_for(engine, seed=7))
    progress = [e for e in events if isinstance(e, Progress)]
    steps = engine.defaults.num_inference_steps
    assert [(p.stage, p.step, p.total_steps) for p in progress] == [
        *(("denoise", i, steps) for i in range(1, steps + 1)),
        ("decode", 1, 1),
        ("encode", 1, 1),
    ]
    result = events[-1]
    assert isinstance(result, Result) and not any(isinstance(e, Result) for e in events[:-1])
    data = video_of(events)
    frames = decode(data)
    assert len(frames) == result.num_frames == engine.defaults.num_frames
    assert frames[0].shape == (engine.defaults.height, engine.defaults.width, 3)
    assert (result.width, result.height, result.fps) == (
        engine.defaults.width,
        engine.defaults.height,
        engine.defaults.fps,
    )
    assert result.mime_type == "video/mp4" and result.seed == 7
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.size_bytes == len(data)
    assert result.duration_seconds == pytest.approx(result.num_frames / result.fps)
    assert result.memory.device == "cpu" and result.memory.weights_bytes == engine.monitor.weights_bytes
    assert sample("scriptreel_video_steps_total") == steps_before + steps
    assert sample("scriptreel_video_frames_total") == frames_before + result.num_frames


@pytest.mark.parametrize(
    ("name", "size", "num_frames", "steps"), [("svd", (96, 48), 5, 2), ("t2v", (80, 48), 17, 3)]
)
def test_requested_size_frames_and_steps(
    request: pytest.FixtureRequest, name: str, size: tuple[int, int], num_frames: int, steps: int
) -> None:
    engine = request.getfixturevalue(name)
    width, height = size
    params = params_for(
        engine, width=width, height=height, num_frames=num_frames, num_inference_steps=steps, fps=12
    )
    events = run(engine, params)
    assert sum(isinstance(e, Progress) and e.stage == "denoise" for e in events) == steps
    frames = decode(video_of(events))
    assert len(frames) == num_frames and frames[0].shape == (height, width, 3)
    with av.open(io.BytesIO(video_of(events)), mode="r") as container:
        assert container.streams.video[0].average_rate == 12


def test_same_seed_same_video(t2v: VideoEngine) -> None:
    def frames(seed: int) -> np.ndarray:
        events = run(t2v, params_for(t2v, seed=seed))
        data = b"".join(e.data for e in events if isinstance(e, Chunk))
        return np.stack(decode_mp4(data)).astype(np.float64)

    first, second, other = frames(42), frames(42), frames(43)
    # The same seed renders the same frames; the mp4 bytes may differ by encoder noise only.
    assert np.abs(first - second).mean() < 2.0
    assert np.abs(first - other).mean() > 10 * max(np.abs(first - second).mean(), 0.5)


def test_seed_zero_picks_one(t2v: VideoEngine) -> None:
    result = run(t2v, params_for(t2v, num_inference_steps=1))[-1]
    assert isinstance(result, Result) and result.seed != 0


def test_video_is_streamed_in_chunks(svd: VideoEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_module.CHUNK_BYTES == 1 << 20
    monkeypatch.setattr(engine_module, "CHUNK_BYTES", 4096)
    events = run(svd, params_for(svd, num_inference_steps=1, seed=3))
    chunks = [e.data for e in events if isinstance(e, Chunk)]
    result = events[-1]
    assert isinstance(result, Result) and len(chunks) == -(-result.size_bytes // 4096) > 1
    assert all(len(c) == 4096 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 4096


# -- validation ---------------------------------------------------------------------------------------
def fields_of(exc: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {v.field for v in exc.value.violations}


def test_validation_reports_every_bad_field_at_once(svd: VideoEngine, t2v: VideoEngine) -> None:
    bad = VideoParams(
        width=65,
        height=2048,
        num_frames=100,
        fps=61,
        num_inference_steps=201,
        guidance_scale=-1.0,
        prompt="x" * 2001,
        negative_prompt="y" * 2001,
    )
    with pytest.raises(InvalidArgument) as exc:
        svd.validate(bad)
    assert fields_of(exc) == {
        "width",
        "height",
        "num_frames",
        "fps",
        "num_inference_steps",
        "guidance_scale",
        "prompt",
        "negative_prompt",
        "image",
    }
    with pytest.raises(InvalidArgument) as exc:
        t2v.validate(VideoParams(num_frames=13, width=72, height=-16))
    assert fields_of(exc) == {"num_frames", "width", "height", "prompt"}
    assert any("8k+1" in v.description for v in exc.value.violations)


def test_validation_rejects_undecodable_images_and_fills_defaults(svd: VideoEngine, t2v: VideoEngine) -> None:
    with pytest.raises(InvalidArgument) as exc:
        svd.validate(VideoParams(image=b"GIF89a not really"))
    assert fields_of(exc) == {"image"}
    filled = svd.validate(params_for(svd))
    assert (filled.width, filled.num_frames, filled.num_inference_steps) == (64, 8, 4)
    assert filled.conditioning is not None and filled.conditioning.size == (64, 64)
    # Text-to-video ignores images; generate validates too.
    assert t2v.validate(VideoParams(prompt="p", image=b"junk")).conditioning is None
    with pytest.raises(InvalidArgument):
        next(iter(t2v.generate(VideoParams(), never)))


# -- cancellation and failures -------------------------------------------------------------------------
def test_should_stop_cancels_at_the_next_step(t2v: VideoEngine) -> None:
    seen: list[Progress] = []
    steps_before = sample("scriptreel_video_steps_total")
    # The caller asks to stop once it has seen step 2; the pipeline is then in step 2's callback or
    # already in step 3, and stops at the end of that step.
    with pytest.raises(Cancelled, match=r"cancelled after step [23] of 20") as exc:
        for event in t2v.generate(params_for(t2v, num_inference_steps=20), lambda: len(seen) >= 2):
            assert isinstance(event, Progress)
            seen.append(event)
    stopped_at = int(exc.value.message.split()[3])
    assert [p.step for p in seen] == list(range(1, len(seen) + 1)) and len(seen) <= stopped_at
    assert sample("scriptreel_video_steps_total") == steps_before + stopped_at  # the pipeline really stopped
    assert not [t for t in threading.enumerate() if t.name == "video-render"]
    assert isinstance(run(t2v, params_for(t2v, num_inference_steps=1))[-1], Result)  # still serving


def test_closing_the_generator_stops_the_pipeline(svd: VideoEngine) -> None:
    stream = svd.generate(params_for(svd, num_inference_steps=20), never)
    assert next(stream) == Progress("denoise", 1, 20)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "video-render"]
    assert isinstance(run(svd, params_for(svd, num_inference_steps=1))[-1], Result)


@contextlib.contextmanager
def nan_filled(tensor: torch.Tensor) -> Iterator[None]:
    """Fill a weight with NaN while inside; restore it after."""
    saved = tensor.detach().clone()
    try:
        with torch.no_grad():
            tensor.fill_(float("nan"))
        yield
    finally:
        with torch.no_grad():
            tensor.copy_(saved)


def test_nonfinite_latents_fail_the_request_and_are_counted(svd: VideoEngine) -> None:
    before = sample("scriptreel_nonfinite_outputs_total", device="cpu")
    bias = svd.pipe.unet.conv_out.bias
    with nan_filled(bias), pytest.raises(NonFiniteOutput, match="NaN/Inf latents at step 1"):
        run(svd, params_for(svd))
    assert sample("scriptreel_nonfinite_outputs_total", device="cpu") == before + 1
    assert isinstance(run(svd, params_for(svd, num_inference_steps=1))[-1], Result)


# -- precision plans ------------------------------------------------------------------------------------
def parameter_and_buffer_bytes(engine: VideoEngine) -> tuple[int, int]:
    modules = [m for m in engine.pipe.components.values() if isinstance(m, torch.nn.Module)]
    params = sum(apply.tensor_bytes(p) for m in modules for p in m.parameters())
    buffers = sum(apply.tensor_bytes(b) for m in modules for b in m.buffers())
    assert params + buffers == engine.monitor.weights_bytes
    return params, buffers


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_halves_the_weights(svd_dir: Path, svd: VideoEngine, precision: str) -> None:
    half = load(svd_dir, Policy(precision=precision), upcast_vae=False)
    assert half.plan.precision == precision and half.plan.keep_fp32 == ()
    params, buffers = parameter_and_buffer_bytes(half)
    full_params, full_buffers = parameter_and_buffer_bytes(svd)
    assert params * 2 == full_params
    assert buffers == full_buffers  # CLIP's int64 position ids
    small = params_for(half, width=32, height=32, num_frames=2, num_inference_steps=1)  # fp16 is slow on CPUs
    assert isinstance(run(half, small)[-1], Result)


def test_half_precision_parameters_halve_for_text_to_video(t2v_dir: Path, t2v: VideoEngine) -> None:
    half = load(t2v_dir, Policy(precision="bf16"))
    params, buffers = parameter_and_buffer_bytes(half)
    full_params, full_buffers = parameter_and_buffer_bytes(t2v)
    assert params * 2 == full_params
    assert buffers == full_buffers  # CogVideoX's positional table stays float64, as diffusers builds it
    assert isinstance(run(half, params_for(half, num_inference_steps=2))[-1], Result)


def test_svd_vae_runs_in_half_precision_unless_upcast(svd_dir: Path) -> None:
    default = load(svd_dir, Policy(precision="bf16"))
    assert {p.dtype for p in default.pipe.vae.parameters()} == {torch.bfloat16}
    engine = load(svd_dir, Policy(precision="bf16"), upcast_vae=True)
    assert {p.dtype for p in engine.pipe.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in engine.pipe.unet.parameters()} == {torch.bfloat16}
    assert "VAE kept in FP32" in engine.plan.reason and engine.plan.keep_fp32 == ("^vae$",)
    assert isinstance(run(engine, params_for(engine, num_inference_steps=2))[-1], Result)


def test_keep_fp32_patterns_stay_float32_and_run(svd_dir: Path, t2v_dir: Path) -> None:
    svd = load(svd_dir, Policy(precision="bf16", keep_fp32=(r"unet\.conv_out", r"unet\.down_blocks")))
    unet = svd.pipe.unet
    assert {p.dtype for p in unet.conv_out.parameters()} == {torch.float32}
    assert {p.dtype for p in unet.down_blocks.parameters()} == {torch.float32}  # a ModuleList
    assert {p.dtype for p in unet.up_blocks.parameters()} == {torch.bfloat16}
    assert isinstance(run(svd, params_for(svd, num_inference_steps=2))[-1], Result)
    t2v = load(
        t2v_dir,
        Policy(precision="bf16", keep_fp32=(r"transformer_blocks\.0$", r"text_encoder\.encoder\.block")),
    )
    blocks = t2v.pipe.transformer.transformer_blocks
    assert {p.dtype for p in blocks[0].parameters()} == {torch.float32}
    assert {p.dtype for p in blocks[1].parameters()} == {torch.bfloat16}
    assert isinstance(run(t2v, params_for(t2v, num_inference_steps=2))[-1], Result)


def test_keep_fp32_of_a_whole_encoder_is_refused(t2v_dir: Path) -> None:
    with pytest.raises(PlanError, match=r"text_encoder\.shared\.weight"):
        load(t2v_dir, Policy(precision="bf16", keep_fp32=("text_encoder",)))


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_storage_shrinks_the_denoiser(t2v_dir: Path, t2v: VideoEngine, precision: str) -> None:
    engine = load(t2v_dir, Policy(precision=precision, allow_fallback=False))
    assert engine.plan.precision == precision
    full = apply.weights_bytes([t2v.pipe.transformer])
    assert apply.weights_bytes([engine.pipe.transformer]) < full / 2
    assert isinstance(run(engine, params_for(engine, num_inference_steps=2))[-1], Result)


def offloaded_footprint(model_dir: Path, family: Family) -> Footprint:
    """The footprint the engine predicts for the folder's default request (meta device: no weights)."""
    config = VideoEngineConfig(model_dir)
    defaults, _ = resolve_limits(model_dir, family)
    relaxed, tight = resolve_knobs(config, family)
    activations = ActivationModel(model_dir, family, vae_fp32=False)
    size = (defaults.width, defaults.height, defaults.num_frames)
    return predict_footprint(component_sizes(model_dir, family), activations, family, *size, relaxed, tight)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(apply.tensor_bytes(p) for p in module.parameters())


@pytest.mark.parametrize(
    ("precision", "compute_dtype"),
    [("fp8", "float16"), ("fp16", "float16"), ("bf16", "bfloat16"), ("fp8", "bfloat16"), ("fp32", "float32")],
)
def test_encode_phase_prices_the_text_encoder_as_loaded(
    t2v_dir: Path, precision: str, compute_dtype: str
) -> None:
    """T5 loads `wo` in FP32 under FP16 (its _keep_in_fp32_modules) and FP8 storage leaves it, the
    embeddings and the norms unquantized: the encode phase prices `wo` at 4 bytes and the whole
    encoder at exactly the bytes it is loaded in."""
    plan = PrecisionPlan(precision, compute_dtype)
    pipe = load_pipeline(t2v_dir, plan, COGVIDEOX, "cpu", MemoryKnobs())
    wo = [p for name, p in pipe.text_encoder.named_parameters() if name.endswith(".wo.weight")]
    assert {p.dtype for p in wo} == {
        torch.float32 if compute_dtype == "float16" else apply.compute_dtype(plan)
    }
    encode = offloaded_footprint(t2v_dir, COGVIDEOX).phases[0]
    held = encode.weights("model", precision)
    assert held.fp32 == sum(p.numel() for p in wo)
    assert held.weight_bytes(precision, compute_dtype) == parameter_bytes(pipe.text_encoder)
    # group offload onloads T5 whole (it has no top-level block list), next to the VAE it leaves on the device
    group = encode.weights("group", precision).weight_bytes(precision, compute_dtype)
    assert group == parameter_bytes(pipe.text_encoder) + parameter_bytes(pipe.vae)


def test_cogvideox_2b_fp8_model_offload_prices_t5_wo_in_fp32() -> None:
    """Full size, on the meta device: FP8 with model offload ran out of an 8 GiB budget on an H200 in
    the encode phase, with T5-XXL's FP32 `wo` (1.0e9 parameters) priced at 1 byte a parameter."""
    fp = offloaded_footprint(REPO / "bench" / "configs" / "cogvideox-2b", COGVIDEOX)
    encode = fp.phases[0].weights("model", "fp8")
    assert encode.fp32 == 24 * 10240 * 4096  # wo, at 4 bytes under FP16
    assert 131e6 < encode.kept < 132e6  # the token embedding and the norms, at 2 bytes
    assert encode.stored == 4_762_310_656 - encode.fp32 - encode.kept  # FP8 leaves, 1 byte
    assert predict_peak(fp, H200, "fp8", "model") > 8 * GiB
    policy = video_policy(Policy(budget_bytes=8 * GiB), COGVIDEOX, H200, None)
    plan = resolve_plan(fp, H200, policy)
    assert (plan.precision, plan.offload) != ("fp8", "model")


def test_svd_xt_phases_hold_nothing_in_fp32() -> None:
    """SVD-XT's image encoder is CLIP (no FP32 modules): unquantized plans price its phases as before."""
    fp = offloaded_footprint(REPO / "bench" / "configs" / "svd-xt", SVD)
    assert all(
        phase.weights(mode, p).fp32 == 0
        for phase in fp.phases
        for mode in phase.resident
        for p in ("fp16", "fp8")
    )
    encode, denoise, _ = fp.phases
    assert encode.weights("model", "fp16").stored == 632_076_800
    assert denoise.weights("model", "bf16").stored == 1_524_623_082


def test_memory_knobs_apply_and_unsupported_ones_are_refused(svd_dir: Path, t2v_dir: Path) -> None:
    svd = load(svd_dir, decode_chunk_size=3, forward_chunking=True)
    assert (svd.knobs.decode_chunk_size, svd.knobs.forward_chunking, svd.knobs.vae_tiling) == (3, True, False)
    assert len(decode(video_of(run(svd, params_for(svd, num_inference_steps=1))))) == 8
    t2v = load(t2v_dir, vae_tiling=True)
    assert t2v.knobs.vae_tiling and t2v.pipe.vae.use_tiling
    frames = decode(video_of(run(t2v, params_for(t2v, width=128, height=96, num_inference_steps=1))))
    assert len(frames) == 9 and frames[0].shape == (96, 128, 3)  # several tiles, reassembled
    for folder, kwargs in (
        (svd_dir, {"vae_tiling": True}),
        (t2v_dir, {"forward_chunking": True}),
        (t2v_dir, {"decode_chunk_size": 4}),
    ):
        with pytest.raises(PlanError, match="not supported"):
            load(folder, **kwargs)
    with pytest.raises(PlanError, match="needs a CUDA device"):
        load(svd_dir, Policy(offload="model"))


@pytest.mark.parametrize("family", ["svd", "t2v"])
def test_split_guidance_renders_the_same_frames(
    family: str, svd_dir: Path, t2v_dir: Path, svd: VideoEngine, t2v: VideoEngine
) -> None:
    whole = svd if family == "svd" else t2v
    split = load(svd_dir if family == "svd" else t2v_dir, split_guidance=True)
    assert split.knobs.split_guidance and not whole.knobs.split_guidance

    def count_passes(engine: VideoEngine) -> list[int]:
        """First-dimension sizes of the denoiser's first layer's inputs, one per denoiser pass."""
        sizes: list[int] = []
        denoiser = getattr(engine.pipe, engine.family.denoiser)
        first_layer = getattr(denoiser, "conv_in", None) or denoiser.patch_embed
        first_layer.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
        return sizes

    split_passes, whole_passes = count_passes(split), count_passes(whole)
    params = dict(seed=7, num_inference_steps=2, guidance_scale=3.0)
    frames = decode(video_of(run(split, params_for(split, **params))))
    reference = decode(video_of(run(whole, params_for(whole, **params))))
    # 2 steps: the whole guidance batch twice, or two passes of half of it per step
    assert len(whole_passes) == 2 and split_passes == [whole_passes[0] // 2] * 4
    assert len(frames) == len(reference)
    for a, b in zip(frames, reference, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0  # same pictures (x264 noise aside)


def test_folders_that_are_not_video_pipelines_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"model_index\.json"):
        load(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(PlanError, match="not supported"):
        load(tmp_path)


def test_metrics_are_exported() -> None:
    text = generate_latest(REGISTRY).decode()
    for name in (
        "scriptreel_video_denoise_step_seconds_bucket",
        "scriptreel_video_steps_total",
        "scriptreel_video_frames_total",
        "scriptreel_video_generation_seconds_count",
    ):
        assert name in text
    assert sample("scriptreel_video_denoise_step_seconds_count") > 0


def test_nonfinite_frames_fail_the_request_and_are_counted(svd: VideoEngine) -> None:
    before = sample("scriptreel_nonfinite_outputs_total", device="cpu")
    bias = svd.pipe.vae.decoder.conv_out.bias
    with nan_filled(bias), pytest.raises(NonFiniteOutput, match="NaN/Inf frames"):
        run(svd, params_for(svd, num_inference_steps=1))
    assert sample("scriptreel_nonfinite_outputs_total", device="cpu") == before + 1


def test_frames_become_uint8_as_numpy_would_round_them() -> None:
    from video_server.pipelines import to_uint8

    video = torch.rand(3, 3, 8, 10, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    expected = (np.clip(video.permute(0, 2, 3, 1).numpy(), 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(video.half()), to_uint8(video.half().float()))
    np.testing.assert_array_equal(to_uint8(video), expected)


def test_plans_without_offload_price_each_parameter_at_its_width() -> None:
    """CogVideoX-2b in FP16 holds T5's `wo` in FP32; FP8 leaves its skipped modules and the VAE in FP16.

    Measured on an H200: FP16 without offload peaked at 29.38 GiB allocated (+0.75 context); counting
    every parameter at 2 bytes predicted 28.8 GiB with the context.
    """
    fp = offloaded_footprint(REPO / "bench" / "configs" / "cogvideox-2b", COGVIDEOX)
    wo = 24 * 10240 * 4096
    assert fp.whole[""].fp32 == wo and fp.whole["fp8"].fp32 == wo
    plain = dataclasses.replace(fp, whole={})
    assert predict_peak(fp, H200, "fp16") == predict_peak(plain, H200, "fp16") + wo * 2
    assert 29.38 + 0.75 <= predict_peak(fp, H200, "fp16") / GiB <= 1.05 * (29.38 + 0.75)
    unquantized = fp.whole["fp8"].kept
    assert predict_peak(fp, H200, "fp8") == predict_peak(plain, H200, "fp8") + wo * 3 + unquantized
    # SVD-XT has no FP32 modules: unquantized plans price exactly as before
    svd = offloaded_footprint(REPO / "bench" / "configs" / "svd-xt", SVD)
    assert predict_peak(svd, H200, "fp16") == predict_peak(dataclasses.replace(svd, whole={}), H200, "fp16")
