"""FP8 storage cast per block (video_server.fp8) against diffusers' per-leaf casting, on tiny denoisers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, UNetSpatioTemporalConditionModel
from torch import nn
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

from media.keyframe import render_keyframe
from video_server import fp8
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.families import SVD
from video_server.footprint import ActivationModel, MemoryKnobs, component_sizes, predict_footprint
from video_server.params import Result, VideoParams
from vram import apply
from vram.plan import Hardware, Policy, predict_peak

REPO = Path(__file__).resolve().parents[2]
H200 = Hardware("cuda:0", 141 * 2**30, (9, 0))
COMPUTE = torch.bfloat16  # CPUs run BF16 convolutions; FP16 ones are slow there
DENOISERS = ["svd", "t2v"]


def load_denoiser(models_dir: Path, name: str, per_block: bool, device: str = "cpu") -> nn.Module:
    if name == "svd":
        module: nn.Module = UNetSpatioTemporalConditionModel.from_pretrained(
            models_dir / "svd" / "unet", torch_dtype=COMPUTE
        )
    else:
        module = CogVideoXTransformer3DModel.from_pretrained(
            models_dir / "t2v" / "transformer", torch_dtype=COMPUTE
        )
    fp8.store_fp8(module.to(device), COMPUTE, per_block=per_block)
    return module


def inputs(name: str, device: str = "cpu") -> dict[str, Any]:
    """A guidance batch of two for the tiny denoiser."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=COMPUTE).to(device)

    if name == "svd":
        ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, dtype=COMPUTE, device=device)
        return {"sample": randn(2, 8, 8, 8, 8), "timestep": 10.0, "added_time_ids": ids,
                "encoder_hidden_states": randn(2, 1, 32), "return_dict": False}  # fmt: skip
    return {"hidden_states": randn(2, 3, 4, 8, 8), "timestep": torch.tensor([10, 10], device=device),
            "encoder_hidden_states": randn(2, 64, 32), "return_dict": False}  # fmt: skip


def run(module: nn.Module, name: str, device: str = "cpu") -> torch.Tensor:
    with torch.inference_mode():
        return module(**inputs(name, device))[0]


def dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}


class CountFp8Casts(TorchDispatchMode):
    """Counts casts of FP8 tensors (to the compute dtype) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy) and args[0].dtype == fp8.FP8:
            self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", DENOISERS)
def test_block_casting_stores_the_same_bytes_as_leaf_casting(models_dir: Path, name: str) -> None:
    leaf, block = (load_denoiser(models_dir, name, per_block) for per_block in (False, True))
    assert dtypes(block) == dtypes(leaf)  # the same parameters are FP8, the rest in the compute dtype
    assert fp8.FP8 in dtypes(block).values() and COMPUTE in dtypes(block).values()
    assert apply.weights_bytes([block]) == apply.weights_bytes([leaf])
    assert block.dtype == leaf.dtype == COMPUTE  # diffusers' ModelMixin.dtype sees the casting hooks


@pytest.mark.parametrize("name", DENOISERS)
def test_block_casting_computes_exactly_what_leaf_casting_does(models_dir: Path, name: str) -> None:
    leaf, block = (load_denoiser(models_dir, name, per_block) for per_block in (False, True))
    stored = dtypes(block)
    assert torch.equal(run(block, name), run(leaf, name))
    assert dtypes(block) == stored  # FP8 again after the forward
    if name == "svd":  # the family whose feed-forward runs in chunks
        for module in (leaf, block):
            module.enable_forward_chunking(chunk_size=1)
        assert torch.equal(run(block, name), run(leaf, name))


def test_a_forward_that_raises_leaves_the_weights_in_fp8(models_dir: Path) -> None:
    unet = load_denoiser(models_dir, "svd", per_block=True)
    stored, reference = dtypes(unet), run(unet, "svd")
    inner = unet.down_blocks[0].attentions[0].transformer_blocks[0]  # a BasicTransformerBlock
    assert isinstance(inner.ff.net[2], nn.Linear) and inner.ff.net[2].weight.dtype == fp8.FP8

    def fail(module: nn.Module, args: Any) -> None:
        raise RuntimeError("boom")

    handle = inner.ff.net[2].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        run(unet, "svd")
    handle.remove()
    assert dtypes(unet) == stored
    assert torch.equal(run(unet, "svd"), reference)


def test_each_fp8_weight_is_cast_once_per_pass_however_often_its_layer_runs(models_dir: Path) -> None:
    leaf, block = (load_denoiser(models_dir, "svd", per_block) for per_block in (False, True))
    fp8_tensors = sum(dtype == fp8.FP8 for dtype in dtypes(block).values())
    calls: list[int] = []
    for module in leaf.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda *_: calls.append(1))

    def casts(module: nn.Module) -> int:
        with CountFp8Casts() as counter:
            run(module, "svd")
        return counter.casts

    assert casts(block) == casts(leaf) == fp8_tensors  # no chunking: every layer runs once
    linear_calls = len(calls)
    for module in (leaf, block):
        module.enable_forward_chunking(chunk_size=1)  # the feed-forward's Linears run once per frame
    calls.clear()
    leaf_casts = casts(leaf)
    assert len(calls) > linear_calls and leaf_casts > fp8_tensors  # per call of each layer
    assert casts(block) == fp8_tensors  # per pass


def test_chunked_feed_forwards_stay_single_matrix_products(models_dir: Path) -> None:
    """Weights cast under inference mode made matmul run frame chunks as per-row batched products."""

    def products(module: nn.Module) -> dict[str, int]:
        module.enable_forward_chunking(chunk_size=2)  # the temporal blocks chunk (non-contiguously) by frame
        with profile() as prof:
            run(module, "svd")  # under inference mode, as requests run
        return {e.key: e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm")}

    unquantized = UNetSpatioTemporalConditionModel.from_pretrained(
        models_dir / "svd" / "unet", torch_dtype=COMPUTE
    )
    expected = products(unquantized)
    assert expected.get("aten::mm", 0) > 0 and "aten::bmm" not in expected
    assert products(load_denoiser(models_dir, "svd", per_block=True)) == expected


def casting_units(module: nn.Module) -> dict[str, int]:
    """The modules that carry a block casting hook, with the parameters each casts."""
    units = {}
    for name, sub in module.named_modules():
        hook = getattr(sub, "_diffusers_hook", None) and sub._diffusers_hook.get_hook(fp8.HOOK_NAME)
        if isinstance(hook, fp8.BlockCastingHook):
            units[name] = sum(t.numel() for t in hook.tensors)
    return units


def test_blocks_cast_their_layers_and_loose_layers_cast_themselves(models_dir: Path) -> None:
    unet = load_denoiser(models_dir, "svd", per_block=True)
    units = casting_units(unet)
    classes = {type(unet.get_submodule(name)).__name__ for name in units}
    assert {"BasicTransformerBlock", "TemporalBasicTransformerBlock", "SpatioTemporalResBlock"} <= classes
    assert "conv_in" in units  # in no block: cast on its own, as diffusers would
    leaves = fp8.fp8_leaves(unet, fp8.skip_patterns(unet))
    assert len(units) < len(leaves) / 3
    assert sum(units.values()) == sum(p.numel() for leaf in leaves.values() for p in leaf.parameters())


def test_fp8_plans_price_the_largest_block_in_the_compute_dtype(models_dir: Path) -> None:
    folder = models_dir / "svd"
    unet = load_denoiser(models_dir, "svd", per_block=True)
    assert component_sizes(folder, SVD).largest_fp8_cast_params == max(casting_units(unet).values())
    # SVD-XT, counted on the meta device: its largest block (an up-path SpatioTemporalResBlock)
    folder = REPO / "bench" / "configs" / "svd-xt"
    sizes = component_sizes(folder, SVD)
    assert 50e6 < sizes.largest_fp8_cast_params < 55e6
    activations = ActivationModel(folder, SVD, vae_fp32=False)
    tight = MemoryKnobs(decode_chunk_size=2, forward_chunking=True, split_guidance=True)
    priced = predict_footprint(
        sizes, activations, SVD, 1024, 576, 25, MemoryKnobs(decode_chunk_size=8), tight
    )
    unpriced = dataclasses.replace(
        priced,
        fp8_cast_params=0,
        phases=tuple(dataclasses.replace(phase, fp8_cast_params={}) for phase in priced.phases),
    )
    copy = sizes.largest_fp8_cast_params * 2  # its FP16 copy while it runs
    assert predict_peak(priced, H200, "fp8") == predict_peak(unpriced, H200, "fp8") + copy
    # offloaded: only in the denoising phase, so a plan whose peak is the decode does not pay it
    denoise = next(phase for phase in priced.phases if phase.name == "denoise")
    assert denoise.fp8_cast_params["model"] == sizes.fp8_cast_params["unet"] == sizes.largest_fp8_cast_params
    assert "group" not in denoise.fp8_cast_params  # cast per layer there, within the phase's margin
    assert next(phase for phase in priced.phases if phase.name == "decode").fp8_cast_params == {}
    for offload in ("none", "model", "group"):
        assert (
            predict_peak(priced, H200, "fp8", offload) <= predict_peak(unpriced, H200, "fp8", offload) + copy
        )
        assert predict_peak(priced, H200, "fp16", offload) == predict_peak(unpriced, H200, "fp16", offload)


def test_fp8_engine_renders_with_split_guidance_and_forward_chunking(models_dir: Path) -> None:
    config = VideoEngineConfig(
        models_dir / "svd",
        device="cpu",
        policy=Policy(precision="fp8", allow_fallback=False),
        forward_chunking=True,
        split_guidance=True,
    )
    engine = VideoEngine.load(config)
    assert engine.plan.precision == "fp8" and engine.knobs.split_guidance and engine.knobs.forward_chunking
    assert casting_units(engine.pipe.unet)
    stored = apply.weights_bytes([engine.pipe.unet])
    image = render_keyframe("fp8", 32, 32, seed=1)
    params = VideoParams(
        image=image, width=32, height=32, num_frames=5, num_inference_steps=2, guidance_scale=3.0
    )
    result = list(engine.generate(params, lambda: False))[-1]
    assert isinstance(result, Result) and result.num_frames == 5
    assert apply.weights_bytes([engine.pipe.unet]) == stored  # no compute-dtype copy left behind


@pytest.mark.gpu
@pytest.mark.parametrize("name", DENOISERS)
@pytest.mark.parametrize("offload", ["group", "model"])
def test_block_casting_under_offload_on_a_gpu(models_dir: Path, name: str, offload: str) -> None:
    from accelerate import cpu_offload_with_hook
    from diffusers.hooks import apply_group_offloading

    reference = run(load_denoiser(models_dir, name, per_block=False, device="cuda"), name, "cuda")
    block = load_denoiser(models_dir, name, per_block=True)
    if offload == "group":  # as video_server.pipelines places the denoiser: block groups, streamed
        apply_group_offloading(
            block, torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1, use_stream=True
        )
    else:
        cpu_offload_with_hook(block, "cuda")
    stored = dtypes(block)
    for _ in range(2):  # group offload's first pass records the order, the second prefetches
        assert torch.equal(run(block, name, "cuda"), reference)
    assert dtypes(block) == stored


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["none", "model", "group"])
def test_fp8_engine_renders_under_each_offload_on_a_gpu(models_dir: Path, offload: str) -> None:
    policy = Policy(precision="fp8", offload=offload, allow_fallback=False)
    engine = VideoEngine.load(VideoEngineConfig(models_dir / "svd", device="cuda", policy=policy))
    assert (engine.plan.precision, engine.plan.offload) == ("fp8", offload)
    stored = apply.weights_bytes([engine.pipe.unet])
    params = VideoParams(
        image=render_keyframe("fp8", 64, 64, seed=1), num_inference_steps=2, guidance_scale=3.0
    )
    result = list(engine.generate(params, lambda: False))[-1]
    assert isinstance(result, Result) and result.num_frames == engine.defaults.num_frames
    assert apply.weights_bytes([engine.pipe.unet]) == stored
