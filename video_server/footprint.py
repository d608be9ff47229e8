"""Predict a video pipeline's memory before loading it (vram.plan.Footprint).

Parameters are counted exactly: each component is built from its config on the `meta` device, which
allocates nothing. Activations are estimated from the request size with the formulas below (bytes at a
2-byte compute dtype, as `Footprint.activation_bytes` wants them); they are deliberately simple and
err on the high side; the server exports the measured peak next to the prediction.

- Denoising, SVD's UNet: the skip connections the up path keeps (every resnet and downsampler output of
  every level) plus a working set at the finest level (hidden states, residuals, norms, temporal
  reshapes, and the GEGLU feed-forward's wide projections, which forward chunking cuts to one frame at a
  time: about five chunks). With split_guidance the batch is 1 instead of 2.
- Denoising, CogVideoX's transformer: a working set of about 12 hidden-size vectors per token (text and
  video tokens; attention through SDPA keeps no score matrix).
- Decoding: the VAE decoder's full-resolution activations for the frames decoded at once (SVD:
  decode_chunk_size; CogVideoX: 9 frames per latent batch, or one tile and its overlap with tiling), as
  a per-family multiple of (first block's channels x pixels x frames), in FP32 when the VAE is kept in
  FP32; plus the decoded float32 video (3 copies).
Denoising and decoding do not overlap, so the estimate is the larger of the two. FP8 plans also hold
the largest unit they cast to the compute dtype (a denoiser block: 52M parameters in SVD-XT, 44M in
CogVideoX-2b; Footprint.fp8_cast_params). A compiled denoiser casts inline (video_server.fp8), each
copy freed after its product, and is priced at the block all the same: inductor's buffer reuse can
keep a freed copy allocated until a later buffer of its size takes it, which a price per layer would
not cover. On the tiny SVD on CPU (split guidance, chunked feed-forward), compiled FP8 peaked 1.07
largest layers above compiled BF16, under the block's 1.74; not yet measured on a GPU.

Measured on an H200 (random weights, real architectures, diffusers 0.42, torch 2.11, 2 steps, FP16 with
SVD's VAE in FP32), request peak minus weights, against this module's prediction:
SVD-XT 1024x576x25, decode chunk 8: 19.4 GB measured, 19.9 predicted; with model offload (chunk 2,
forward chunking): 5.3 vs 5.4; CogVideoX-2b 720x480x49: 15.9 vs 16.5, and with model offload and VAE
tiling at most 5.0 vs 6.6. Decoding dominates all of them.
"""

from __future__ import annotations

import importlib
import json
import re
import struct
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from video_server.families import COGVIDEOX, Family, read_config
from vram.plan import QUANTIZED, Footprint, Phase, Resident

FORWARD_CHUNKS = 5
HALF = 2  # bytes per element in the unit Footprint.activation_bytes is expressed in
# SVD UNet working set at the finest level, in multiples of (first block's channels x latent pixels x
# frames x batch): fitted to the H200 step peaks of issue 5 (SVD-XT UNet, 25 x 1024 x 576, batch 2,
# FP16: 7.75 GiB of activations, 4.55 GiB with forward chunking), given the skip connections counted
# below. The feed-forward term is what chunking divides (video_server.pipelines.forward_chunk: at least
# FORWARD_CHUNKS chunks; fewer frames than that per chunk only lowers it).
UNET_WORKING = 10
UNET_FEED_FORWARD = 12
TRANSFORMER_VECTORS_PER_TOKEN = 12
# VAE decoder activations at full resolution, in multiples of (first block's channels x pixels x frames
# decoded at once); measured 7.8 (SVD-XT's temporal decoder) and 19.2 (CogVideoX's causal 3D decoder).
VAE_ACTIVATION_FACTOR = {"svd": 8, "cogvideox": 20}
VIDEO_COPIES = 3  # decoded video: the decoder's outputs, their concatenation, the post-processed array
COGVIDEOX_FRAMES_PER_DECODE = 9  # (the first) latent batch of 3 latent frames decodes to 9 frames


@dataclass(frozen=True)
class MemoryKnobs:
    """Activation-memory settings of a loaded pipeline (PrecisionPlan's video fields).

    Attributes:
        decode_chunk_size: Frames the VAE decodes at once (SVD); 0 where the pipeline has no such knob.
        forward_chunking: The denoiser's feed-forward runs one chunk at a time.
        vae_tiling: The VAE decodes in spatial tiles.
        split_guidance: The denoiser runs guidance's conditional and unconditional halves one after
            the other (half the denoising activations, at a small cost in speed).
    """

    decode_chunk_size: int = 0
    forward_chunking: bool = False
    vae_tiling: bool = False
    split_guidance: bool = False


@dataclass(frozen=True)
class ComponentSizes:
    """Sizes of a pipeline's torch components, counted from their configs.

    `meta` holds the components as built on the meta device, for checks and prices that need module
    names and no weights. `fp8_cast_params`: per component FP8 storage covers, the parameters of the
    largest unit it casts to the compute dtype at once (the denoiser's largest block, the encoder's
    largest layer; video_server.fp8).
    """

    params: dict[str, int]
    buffer_bytes: int
    largest_layer_params: int
    trained_in_bf16: bool
    meta: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    fp8_cast_params: dict[str, int] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        """Parameters of all components."""
        return sum(self.params.values())

    @property
    def largest_fp8_cast_params(self) -> int:
        """The largest unit FP8 storage casts at once, over all components."""
        return max(self.fp8_cast_params.values(), default=0)


def component_sizes(model_dir: Path, family: Family) -> ComponentSizes:
    """Count each torch component's parameters by building it on the meta device (nothing is allocated)."""
    from video_server import fp8

    index = read_config(model_dir / "model_index.json")
    params: dict[str, int] = {}
    meta: dict[str, nn.Module] = {}
    buffer_bytes = 0
    largest = 0
    cast: dict[str, int] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or None in spec:
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue  # tokenizer, scheduler, image processor
        module = meta[name] = _build_on_meta(cls, model_dir / name)
        params[name] = sum(p.numel() for p in module.parameters())
        buffer_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
        largest = max(largest, _largest_layer(module))
        if name in (family.denoiser, family.encoder):
            # also the price of a compiled denoiser, cast inline (see the module docstring)
            cast[name] = fp8.largest_unit_params(module, "block" if name == family.denoiser else "layer")
    bf16 = _stored_in_bf16(model_dir / family.denoiser)
    return ComponentSizes(params, buffer_bytes, largest, bf16, meta, cast)


def _build_on_meta(cls: type, folder: Path) -> nn.Module:
    from diffusers import ModelMixin

    with torch.device("meta"):
        if issubclass(cls, ModelMixin):
            return cls.from_config(cls.load_config(folder))
        return cls(cls.config_class.from_pretrained(folder))  # type: ignore[attr-defined,call-arg,return-value]


def _largest_layer(module: nn.Module) -> int:
    """Parameters of the largest block (a ModuleList entry) or leaf: what block/leaf offload onloads."""
    largest = 0
    for child in module.modules():
        if isinstance(child, nn.ModuleList):
            largest = max([largest, *(sum(p.numel() for p in block.parameters()) for block in child)])
        elif not list(child.children()):
            largest = max(largest, sum(p.numel() for p in child.parameters()))
    return largest


def _stored_in_bf16(folder: Path) -> bool:
    """Whether the checkpoint's weights are stored in BF16 (read from a safetensors header)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return False
    with files[0].open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    dtypes = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
    return bool(dtypes) and dtypes.count("BF16") * 2 > len(dtypes)


class ActivationModel:
    """Estimates a pipeline's activation peak for a request size (see the module docstring)."""

    def __init__(self, model_dir: Path, family: Family, vae_fp32: bool) -> None:
        self.family = family
        self.denoiser = read_config(model_dir / family.denoiser / "config.json")
        self.vae = read_config(model_dir / "vae" / "config.json")
        self.vae_fp32 = vae_fp32
        self.spatial = 2 ** (len(self.vae["block_out_channels"]) - 1)

    def bytes(
        self, width: int, height: int, num_frames: int, knobs: MemoryKnobs, guidance: bool = True
    ) -> int:
        """Peak activation bytes at a 2-byte compute dtype."""
        return max(
            self.denoise_bytes(width, height, num_frames, knobs, guidance),
            self.decode_bytes(width, height, num_frames, knobs),
        )

    def denoise_bytes(
        self, width: int, height: int, num_frames: int, knobs: MemoryKnobs, guidance: bool = True
    ) -> int:
        """Peak activation bytes of a denoising step, at a 2-byte compute dtype."""
        batch = 2 if guidance and not knobs.split_guidance else 1
        if self.family is COGVIDEOX:
            return int(self._transformer(width, height, num_frames, batch))
        return int(self._unet(width, height, num_frames, batch, knobs.forward_chunking))

    def decode_bytes(self, width: int, height: int, num_frames: int, knobs: MemoryKnobs) -> int:
        """Peak activation bytes of the VAE decode and the decoded video."""
        return int(self._decode(width, height, num_frames, knobs))

    def _unet(self, width: int, height: int, frames: int, batch: int, chunked: bool) -> float:
        channels = self.denoiser["block_out_channels"]
        per_block = self.denoiser.get("layers_per_block", 2)
        per_block = per_block if isinstance(per_block, int) else max(per_block)
        area = (width // self.spatial) * (height // self.spatial)
        skips = channels[0] * area + sum(
            (per_block + (i < len(channels) - 1)) * c * area / 4**i for i, c in enumerate(channels)
        )
        feed_forward = UNET_FEED_FORWARD * channels[0] * area / (FORWARD_CHUNKS if chunked else 1)
        working = UNET_WORKING * channels[0] * area + feed_forward
        return HALF * batch * frames * (skips + working)

    def _transformer(self, width: int, height: int, frames: int, batch: int) -> float:
        patch = self.denoiser.get("patch_size", 2)
        latent_frames = (frames - 1) // self.vae.get("temporal_compression_ratio", 4) + 1
        tokens = latent_frames * (width // self.spatial // patch) * (height // self.spatial // patch)
        tokens += self.denoiser.get("max_text_seq_length", 226)
        hidden = self.denoiser["num_attention_heads"] * self.denoiser["attention_head_dim"]
        return HALF * batch * tokens * hidden * TRANSFORMER_VECTORS_PER_TOKEN

    def _decode(self, width: int, height: int, frames: int, knobs: MemoryKnobs) -> float:
        per_pixel = VAE_ACTIVATION_FACTOR[self.family.name] * self.vae["block_out_channels"][0]
        if self.family is COGVIDEOX:
            at_once = min(frames, COGVIDEOX_FRAMES_PER_DECODE)
        else:
            at_once = min(frames, knobs.decode_chunk_size or frames)
        area = width * height
        if knobs.vae_tiling:
            tile = (self.vae.get("sample_height", height) // 2) * (self.vae.get("sample_width", width) // 2)
            area = min(area, int(tile * 1.5))  # one tile plus its overlap with the neighbours
        width_bytes = 4 if self.vae_fp32 else HALF
        vae = width_bytes * at_once * area * per_pixel
        video = 4 * frames * 3 * width * height * VIDEO_COPIES
        return vae + video


def predict_footprint(
    sizes: ComponentSizes,
    activations: ActivationModel,
    family: Family,
    width: int,
    height: int,
    num_frames: int,
    relaxed: MemoryKnobs,
    tight: MemoryKnobs,
) -> Footprint:
    """Predict the Footprint of a pipeline for requests up to width x height x num_frames.

    Args:
        sizes: Parameter counts of the components.
        activations: The activation estimator.
        family: The pipeline family.
        width: Largest width served.
        height: Largest height served.
        num_frames: Largest frame count served.
        relaxed: Knobs used when nothing is offloaded.
        tight: Knobs used with offload, or without it when the relaxed ones do not fit
            (PrecisionPlan.chunked).

    Offloaded plans are priced per phase (vram.plan.Phase): encoding (the conditioning encoder),
    denoising and decoding, each with what the offload mode keeps on the device. Model offload holds
    the running component only; group offload (block level, the VAE excluded) the VAE plus the
    denoiser's largest block, or what the encoder onloads at once (group_onload: all of T5 or CLIP);
    sequential offload streams every layer, two at most on the device. The running component's
    parameters are split by the width each plan holds them at (resident_params): T5's `wo` stays in
    FP32 under FP16, FP8 leaves and Linear weights are what FP8 and int8 plans quantize. On an H200
    this priced SVD-XT's measured request peaks within 1% (model offload) and as an upper bound (group
    offload: 2.74 GiB measured, the decode phase's 2.92 GiB predicted).
    """
    size = (width, height, num_frames)
    plain = _resident(sizes, family, None)
    quantized = {precision: _resident(sizes, family, precision) for precision in QUANTIZED}
    stages = (  # name, activations, the component FP8 storage casts in it
        ("encode", 0, family.encoder),
        ("denoise", activations.denoise_bytes(*size, tight), family.denoiser),
        ("decode", activations.decode_bytes(*size, tight), None),
    )
    return Footprint(
        params=sizes.total_params,
        buffer_bytes=sizes.buffer_bytes,
        activation_bytes=activations.bytes(*size, relaxed),
        chunked_activation_bytes=activations.bytes(*size, tight),
        trained_in_bf16=sizes.trained_in_bf16,
        phases=tuple(  # offloaded plans are priced by these alone
            Phase(
                name,
                stage_activations,
                plain[name],
                {q: by_stage[name] for q, by_stage in quantized.items()},
                _fp8_cast(sizes, component),
            )
            for name, stage_activations, component in stages
        ),
        fp8_cast_params=sizes.largest_fp8_cast_params,
        whole={"": _whole(sizes, family, None), **{q: _whole(sizes, family, q) for q in QUANTIZED}},
    )


def _whole(sizes: ComponentSizes, family: Family, precision: str | None) -> Resident:
    """Every component's parameters, by the width a plan of `precision` holds them at (no offload)."""
    total = Resident()
    for name, count in sizes.params.items():
        module = sizes.meta.get(name)
        quantizable = name in (family.denoiser, family.encoder)
        held = Resident(count) if module is None else resident_params(module, precision, quantizable)
        total = _sum(total, held)
    return total


def _fp8_cast(sizes: ComponentSizes, component: str | None) -> dict[str, int]:
    """Per offload mode, the parameters FP8 storage casts at once in `component`, where priced.

    video_server.pipelines.apply_plan casts per block under model offload (priced: a block's copy, up
    to 0.1 GiB for SVD-XT) and per layer under group and sequential offload. A layer's copy is not
    priced: the phase estimates already cover it with room to spare (SVD-XT, FP8 + group offload,
    cast per layer: 3.49 GiB measured with the context, 3.96 predicted without the copy; H200, 4a8a24f).
    """
    if component is None:
        return {}
    return {"model": sizes.fp8_cast_params.get(component, 0)}


def _resident(sizes: ComponentSizes, family: Family, precision: str | None) -> dict[str, dict[str, Resident]]:
    """Per stage, then per offload mode, the parameters on the device (precision None: unquantized)."""

    def held(name: str, group: bool = False) -> Resident:
        module = sizes.meta.get(name)
        if module is None:
            return Resident(sizes.params.get(name, 0))
        names = group_onload(module) if group else None
        return resident_params(module, precision, name in (family.denoiser, family.encoder), names)

    vae, two_layers = held("vae"), Resident(sizes.largest_layer_params * 2)
    return {
        "encode": {
            "model": held(family.encoder),
            "group": _sum(held(family.encoder, group=True), vae),
            "sequential": two_layers,
        },
        "denoise": {
            "model": held(family.denoiser),
            "group": _sum(Resident(sizes.largest_layer_params), vae),
            "sequential": two_layers,
        },
        "decode": {"model": vae, "group": vae, "sequential": two_layers},
    }


def resident_params(
    module: nn.Module, precision: str | None, quantizable: bool, names: Container[str] | None = None
) -> Resident:
    """How a plan holds a component's parameters on the device (those in `names`; all without).

    Args:
        module: The component, built on any device (the meta device will do).
        precision: A quantized precision (fp8: the FP8 leaves of video_server.fp8 are stored in
            it; int8, int4: the Linear weights, through torchao), or None for an unquantized plan,
            which stores every parameter at its own width.
        quantizable: The plan quantizes this component (the denoiser and the encoder, not the VAE).
        names: Parameter names to count.

    In any plan, what transformers keeps in FP32 in FP16 loads (the model's `_keep_in_fp32_modules`,
    matched on parameter names as transformers does: T5's `wo`) and does not quantize is `fp32`; a
    quantized plan's unquantized rest (embeddings, norms, FP8-skipped modules) is `kept`.
    """
    quantized = _quantized_names(module, precision) if precision and quantizable else set()
    fp32 = _fp32_names(module)
    stored = kept = wide = 0
    for name, param in module.named_parameters():
        if names is not None and name not in names:
            continue
        count = param.numel()
        if name in quantized or (precision is None and name not in fp32):
            stored += count
        elif name in fp32:
            wide += count
        else:
            kept += count
    return Resident(stored, kept, wide)


def group_onload(module: nn.Module) -> set[str]:
    """Parameter names diffusers' block-level group offload holds on the device at once.

    Each entry of the module's top-level ModuleLists (and Sequentials) is a group; everything else is
    one more group, on the device for the whole forward. A module without such lists (T5, CLIP's
    vision model) is therefore onloaded whole.
    """
    blocks = [
        {f"{name}.{i}.{p}" for p, _ in block.named_parameters()}
        for name, child in module.named_children()
        if isinstance(child, nn.ModuleList | nn.Sequential)
        for i, block in enumerate(child)
    ]
    in_blocks = set().union(*blocks)
    rest = {name for name, _ in module.named_parameters() if name not in in_blocks}
    return rest | max(blocks, key=len, default=set())


def _quantized_names(module: nn.Module, precision: str) -> set[str]:
    """Parameters a quantized precision stores quantized (video_server.pipelines._store_quantized)."""
    from video_server import fp8

    if precision == "fp8":
        leaves = fp8.fp8_leaves(module, fp8.skip_patterns(module))
        return {f"{path}.{name}" for path, leaf in leaves.items() for name, _ in leaf.named_parameters()}
    return {f"{path}.weight" for path, child in module.named_modules() if isinstance(child, nn.Linear)}


def _fp32_names(module: nn.Module) -> set[str]:
    """Parameters transformers loads in FP32 when asked for FP16 (its `_keep_in_fp32_modules`)."""
    from transformers import PreTrainedModel

    patterns = getattr(module, "_keep_in_fp32_modules", None) or ()
    if not isinstance(module, PreTrainedModel) or not patterns:
        return set()
    # transformers' syntax: "*" is any run of characters, the rest a regular expression
    regexes = [re.compile(p.replace("*", ".*")) for p in patterns]
    return {name for name, _ in module.named_parameters() if any(r.search(name) for r in regexes)}


def _sum(*parts: Resident) -> Resident:
    return Resident(*(sum(counts) for counts in zip(*parts, strict=True)))
