"""FP8 storage cast per block (video_server.fp8) against diffusers' per-leaf casting, on tiny denoisers."""

from __future__ import annotations

import copy
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


def load_denoiser(models_dir: Path, name: str, casting: fp8.Casting, device: str = "cpu") -> nn.Module:
    if name == "svd":
        module: nn.Module = UNetSpatioTemporalConditionModel.from_pretrained(
            models_dir / "svd" / "unet", torch_dtype=COMPUTE
        )
    else:
        module = CogVideoXTransformer3DModel.from_pretrained(
            models_dir / "t2v" / "transformer", torch_dtype=COMPUTE
        )
    fp8.store_fp8(module.to(device), COMPUTE, casting=casting)
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
    leaf, block = (load_denoiser(models_dir, name, casting) for casting in ("layer", "block"))
    assert dtypes(block) == dtypes(leaf)  # the same parameters are FP8, the rest in the compute dtype
    assert fp8.FP8 in dtypes(block).values() and COMPUTE in dtypes(block).values()
    assert apply.weights_bytes([block]) == apply.weights_bytes([leaf])
    assert block.dtype == leaf.dtype == COMPUTE  # diffusers' ModelMixin.dtype sees the casting hooks


@pytest.mark.parametrize("name", DENOISERS)
def test_block_casting_computes_exactly_what_leaf_casting_does(models_dir: Path, name: str) -> None:
    leaf, block = (load_denoiser(models_dir, name, casting) for casting in ("layer", "block"))
    stored = dtypes(block)
    assert torch.equal(run(block, name), run(leaf, name))
    assert dtypes(block) == stored  # FP8 again after the forward
    if name == "svd":  # the family whose feed-forward runs in chunks
        for module in (leaf, block):
            module.enable_forward_chunking(chunk_size=1)
        assert torch.equal(run(block, name), run(leaf, name))


def test_a_forward_that_raises_leaves_the_weights_in_fp8(models_dir: Path) -> None:
    unet = load_denoiser(models_dir, "svd", "block")
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
    leaf, block = (load_denoiser(models_dir, "svd", casting) for casting in ("layer", "block"))
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
    assert products(load_denoiser(models_dir, "svd", "block")) == expected


@pytest.mark.parametrize("name", DENOISERS)
def test_inline_casting_stores_the_same_bytes_and_computes_what_block_casting_does(
    models_dir: Path, name: str
) -> None:
    block, inline = (load_denoiser(models_dir, name, casting) for casting in ("block", "inline"))
    stored = dtypes(inline)
    assert stored == dtypes(block) and fp8.FP8 in stored.values()
    assert apply.weights_bytes([inline]) == apply.weights_bytes([block])
    assert inline.dtype == COMPUTE  # ModelMixin.dtype sees the inline hooks too
    if name == "svd":
        for module in (block, inline):
            module.enable_forward_chunking(chunk_size=2)  # non-contiguous frame chunks
    assert torch.equal(run(inline, name), run(block, name))
    assert dtypes(inline) == stored  # nothing cast in place


@pytest.mark.parametrize(
    ("layer", "shape", "kwargs"),
    [
        (nn.Linear(16, 8), (2, 6, 16), {}),
        (nn.Linear(16, 8), (16, 6, 2), {}),  # reversed below: non-contiguous, as a frame chunk is
        (nn.Linear(16, 8, bias=False), (16, 6, 2), {}),
        (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9), {}),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 9, 9), {}),
        (nn.Conv3d(4, 6, (3, 1, 1)), (2, 4, 5, 3, 3), {}),
        (nn.ConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5), {"output_size": (12, 12)}),
    ],
)
def test_each_kind_of_leaf_computes_inline_what_it_computes_on_its_rounded_weights(
    layer: nn.Module, shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    rounded = copy.deepcopy(layer).to(fp8.FP8).float()  # the weights FP8 storage keeps, in FP32
    fp8.store_fp8(layer, torch.float32, casting="inline")
    assert {t.dtype for t in layer.parameters()} == {fp8.FP8}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if isinstance(layer, nn.Linear) and shape[-1] != layer.in_features:
        x = x.permute(*range(x.dim() - 1, -1, -1))  # the input reversed: every stride out of order
    with torch.inference_mode():
        ours, reference = layer(x, **kwargs), rounded(x, **kwargs)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("name", DENOISERS)
def test_inline_casting_traces_into_one_graph_and_block_casting_breaks(models_dir: Path, name: str) -> None:
    def explain(module: nn.Module) -> Any:
        torch._dynamo.reset()
        with torch.inference_mode():
            return torch._dynamo.explain(module)(**inputs(name))

    inline = explain(load_denoiser(models_dir, name, "inline"))
    assert (inline.graph_count, inline.graph_break_count) == (1, 0)
    block = explain(load_denoiser(models_dir, name, "block"))  # sets .data to another dtype mid-forward
    assert block.graph_break_count > 0


def test_inline_casting_keeps_chunked_feed_forwards_single_matrix_products(models_dir: Path) -> None:
    """Eagerly and in torch.compile's decomposed graph (aot_eager: what inductor lowers), inference mode."""

    def products(module: nn.Module) -> dict[str, int]:
        with profile() as prof:
            run(module, "svd")
        names = ("aten::mm", "aten::addmm", "aten::bmm")
        return {e.key: e.count for e in prof.key_averages() if e.key in names}

    inline = load_denoiser(models_dir, "svd", "inline")
    inline.enable_forward_chunking(chunk_size=2)
    eager = products(inline)
    assert eager.get("aten::mm", 0) + eager.get("aten::addmm", 0) > 0 and "aten::bmm" not in eager
    torch._dynamo.reset()
    inline.compile(backend="aot_eager", dynamic=False)
    run(inline, "svd")  # compiles
    assert products(inline) == eager


def casting_units(module: nn.Module) -> dict[str, int]:
    """The modules that carry a block casting hook, with the parameters each casts."""
    units = {}
    for name, sub in module.named_modules():
        hook = getattr(sub, "_diffusers_hook", None) and sub._diffusers_hook.get_hook(fp8.HOOK_NAME)
        if isinstance(hook, fp8.BlockCastingHook):
            units[name] = sum(t.numel() for t in hook.tensors)
    return units


def test_blocks_cast_their_layers_and_loose_layers_cast_themselves(models_dir: Path) -> None:
    unet = load_denoiser(models_dir, "svd", "block")
    units = casting_units(unet)
    classes = {type(unet.get_submodule(name)).__name__ for name in units}
    assert {"BasicTransformerBlock", "TemporalBasicTransformerBlock", "SpatioTemporalResBlock"} <= classes
    assert "conv_in" in units  # in no block: cast on its own, as diffusers would
    leaves = fp8.fp8_leaves(unet, fp8.skip_patterns(unet))
    assert len(units) < len(leaves) / 3
    assert sum(units.values()) == sum(p.numel() for leaf in leaves.values() for p in leaf.parameters())


def test_fp8_plans_price_the_largest_block_in_the_compute_dtype(models_dir: Path) -> None:
    folder = models_dir / "svd"
    unet = load_denoiser(models_dir, "svd", "block")
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

    reference = run(load_denoiser(models_dir, name, "layer", device="cuda"), name, "cuda")
    block = load_denoiser(models_dir, name, "block")
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
