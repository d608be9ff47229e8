"""Precision plans: what a server resolves its policy into, and how the plan is chosen.

`resolve_plan` is a pure function of (model footprint, hardware, policy): no torch calls, so every
branch is testable without a GPU. The order of candidates follows DESIGN.md section 3.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from vram.sizes import format_bytes

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
COMPUTE_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FALLBACK_ORDER = ("fp16", "bf16", "fp32")
QUANTIZED = ("fp8", "int8", "int4")
# Bytes per parameter of the largest quantized Linear that torchao's weight-only kernels hold while it
# runs (the weight dequantized for the matrix product). Measured on an H200 with the 6.24e9-parameter
# GLM (largest Linear 112e6 parameters): FP8 allocated 428 MiB blocks and peaked 1.08 GiB above its
# weights; INT8 0.35 GiB (bench/results/compat.json and llm.json, docs/BENCHMARKS.md).
QUANTIZED_WORKSPACE_PER_PARAM = {"fp8": 10.0, "int8": 4.0, "int4": 4.0}
# The same workspace held by CUDA graphs (as a share of the eager one): the captured decode step keeps
# its dequantized FP16 copy in the graphs' private pool. INT8 GLM at batch 2: 229.77 MiB in private
# pools (2.15 bytes per parameter of the 112e6 largest Linear) when the eager prefill's workspace then
# failed to fit a 7.0 GiB allocator cap (bench/results/compat.json, 2026-11-28).
GRAPH_POOL_WORKSPACE = 0.5
OFFLOAD_MODES = ("none", "model", "group", "sequential")
# Bytes a process holds on a GPU outside PyTorch's allocator: the CUDA context and the libraries'
# workspaces (0.74 to 0.76 GiB measured on an H200 with torch 2.11, bench/results/precision.json's
# outside_allocator_bytes). Counted in every GPU prediction, and kept out of the allocator's share of
# a budget, so that a budget bounds the whole process (vram.monitor).
CUDA_CONTEXT_BYTES = 768 * 2**20


class PlanError(ValueError):
    """A policy that cannot be honoured on this hardware or budget (the server refuses to start)."""


@dataclass(frozen=True)
class Hardware:
    """What the plan needs to know of the device.

    Attributes:
        device: "cpu" or "cuda:N".
        total_bytes: Device memory; for a CPU, the RAM the process may use.
        compute_capability: (major, minor) for CUDA devices, None on CPU.
        bf16: Whether BF16 arithmetic is supported natively.
    """

    device: str
    total_bytes: int
    compute_capability: tuple[int, int] | None = None
    bf16: bool = True

    @property
    def is_cuda(self) -> bool:
        """True for CUDA devices."""
        return self.device.startswith("cuda")

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper) on."""
        return self.compute_capability is not None and self.compute_capability >= (8, 9)


class Resident(NamedTuple):
    """Parameters on the device during a stage, by the width a plan holds them at.

    Attributes:
        stored: At the plan's precision.
        kept: At the compute dtype's width (what a quantized plan leaves unquantized: embeddings,
            norms, a VAE).
        fp32: In FP32 when the compute dtype is FP16, at the compute dtype's width otherwise: the
            modules transformers loads in FP32 in FP16 loads (a model's `_keep_in_fp32_modules`).
    """

    stored: int = 0
    kept: int = 0
    fp32: int = 0

    def weight_bytes(self, precision: str, compute_dtype: str) -> float:
        """Bytes of these parameters in a plan of `precision` computing in `compute_dtype`."""
        width = 4 if compute_dtype == "float32" else 2
        wide = 4 if compute_dtype == "float16" else width
        return self.stored * BYTES_PER_PARAM[precision] + self.kept * width + self.fp32 * wide


@dataclass(frozen=True)
class Phase:
    """One stage of a request when weights are offloaded.

    Attributes:
        name: For messages ("denoise").
        activation_bytes: Peak activations of the stage at a 2-byte compute dtype (scaled like
            Footprint.activation_bytes), with the knobs used when offloading.
        resident: Per offload mode (model, group, sequential): the parameters on the device during
            the stage, in unquantized plans and in quantized ones `quantized` does not name.
        quantized: Per quantized precision, then per offload mode: the same where that precision
            stores only part of them quantized (video: FP8 leaves, or Linear weights for int8).
        fp8_cast_params: Per offload mode, the parameters an FP8 plan holds in the compute dtype at
            once during the stage because it casts them to run (Footprint.fp8_cast_params, for this
            stage's component and that mode's casting unit).
    """

    name: str
    activation_bytes: int
    resident: dict[str, Resident] = field(default_factory=dict)
    quantized: dict[str, dict[str, Resident]] = field(default_factory=dict)
    fp8_cast_params: dict[str, int] = field(default_factory=dict)

    def weights(self, offload: str, precision: str) -> Resident:
        """The parameters on the device during the stage under `offload`, in a plan of `precision`."""
        chosen = self.quantized.get(precision, {}).get(offload) or self.resident.get(offload)
        return Resident(*chosen) if chosen else Resident()


@dataclass(frozen=True)
class Footprint:
    """Memory a model needs besides its weights, as the engine predicts it before loading.

    Attributes:
        params: Parameter count of all components (from the config, before loading).
        buffer_bytes: Bytes of non-parameter buffers (kept in their own dtype).
        activation_bytes: Peak activation bytes per compute-dtype byte width of 2 (fp16) for the
            configured limits; scaled by the compute dtype's width. KV cache included for LLMs.
        trained_in_bf16: The checkpoint's native dtype is BF16 (auto then prefers BF16 over FP16).
        offloadable_fraction: Fraction of weights that model offload keeps off the device at peak,
            for engines that describe no phases.
        largest_layer_params: Parameters of the largest single layer (sequential/group offload),
            for engines that describe no phases.
        phases: The stages of a request under offload (video: encode, denoise, decode), each with
            the weights resident on the device and its activations; an offloaded plan's peak is the
            largest stage's. Empty: weights (reduced as above) plus activation_bytes.
        module_params: (module name, parameters it holds directly), so keep_fp32 patterns and
            quantize_skip can be priced exactly; empty when the engine does not know them.
        quantize_skip: Module-name patterns that quantized plans leave in the compute dtype.
        largest_linear_params: Parameters of the largest Linear a quantized plan stores quantized
            (its dequantized copy while it runs is priced by QUANTIZED_WORKSPACE_PER_PARAM); 0 where
            the engine quantizes otherwise (the video server's FP8: fp8_cast_params).
        workspace_copies: How many such workspaces are held at the peak: an LLM that replays CUDA
            graphs keeps one dequantized copy in the graphs' private pool besides the eager prefill's
            (GRAPH_POOL_WORKSPACE).
        chunked_activation_bytes: Activations without offload under the engine's memory-saving
            knobs (video: split guidance, feed-forward and decode chunking), at 2 bytes per element;
            0 where the engine has none. `auto` tries these plans after the plain ones and before any
            offload: the knobs cost a little speed, offloading costs much more.
        fp8_cast_params: Parameters an FP8 plan also holds in the compute dtype at once because it
            casts them to run (video: the largest denoiser block or encoder layer); 0 where none.
            Offloaded plans price each phase's own (Phase.fp8_cast_params) instead.
        whole: All parameters split by the width a plan without offload holds them at, per quantized
            precision and under "" for unquantized plans (video: FP32 modules of a component, what
            FP8 or int8 leave unquantized); empty: every parameter at the plan's width, adjusted by
            module_params.
    """

    params: int
    buffer_bytes: int = 0
    activation_bytes: int = 0
    trained_in_bf16: bool = False
    offloadable_fraction: float = 0.0
    largest_layer_params: int = 0
    phases: tuple[Phase, ...] = ()
    module_params: tuple[tuple[str, int], ...] = ()
    quantize_skip: tuple[str, ...] = ()
    largest_linear_params: int = 0
    workspace_copies: float = 1.0
    chunked_activation_bytes: int = 0
    fp8_cast_params: int = 0
    whole: dict[str, Resident] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """A server's precision settings, as the operator wrote them.

    Attributes:
        precision: auto, fp32, fp16, bf16, fp8, int8 or int4.
        keep_fp32: Module-name patterns (regular expressions, matched with re.search) kept in FP32.
        budget_bytes: Hard cap for the process; None for the whole device.
        offload: auto, none, model, group or sequential (video servers).
        allow_fallback: Whether a failed load or non-finite warm-up may move along FP16 -> BF16 -> FP32.
        supports_offload: The engine can offload (video pipelines); LLM engines cannot.
        quantized_backends: Precisions the installed libraries can run (e.g. torchao present).
        offload_precisions: Precisions whose weights the engine can offload; plans that offload any
            other are never chosen (video: torchao's int8/int4 tensors cannot be moved between the
            devices by the offload hooks).
    """

    precision: str = "auto"
    keep_fp32: tuple[str, ...] = ()
    budget_bytes: int | None = None
    offload: str = "auto"
    allow_fallback: bool = True
    supports_offload: bool = False
    quantized_backends: frozenset[str] = frozenset({"fp8", "int8", "int4"})
    offload_precisions: frozenset[str] = frozenset(PRECISIONS)


@dataclass(frozen=True)
class PrecisionPlan:
    """The concrete plan a server runs with.

    Attributes:
        precision: Weight storage precision (one of PRECISIONS).
        compute_dtype: "float32", "float16" or "bfloat16".
        keep_fp32: Module-name patterns kept in FP32.
        offload: none, model, group or sequential.
        chunked: Without offload, run with the engine's memory-saving knobs
            (Footprint.chunked_activation_bytes). Offloaded plans use them anyway (False there).
        predicted_peak_bytes: Predicted peak (weights + activations + context) on the device.
        budget_bytes: The cap the prediction was checked against (None: whole device).
        requested: The policy's precision setting.
        reason: Why this plan, in one sentence.
        fallbacks: Precisions abandoned before this one, with reasons.
    """

    precision: str
    compute_dtype: str
    keep_fp32: tuple[str, ...] = ()
    offload: str = "none"
    chunked: bool = False
    predicted_peak_bytes: int = 0
    budget_bytes: int | None = None
    requested: str = "auto"
    reason: str = ""
    fallbacks: tuple[str, ...] = ()

    def with_fallback(self, precision: str, why: str, footprint: Footprint, hw: Hardware) -> PrecisionPlan:
        """The plan to try after this one failed; `why` is recorded in `fallbacks`."""
        peak = predict_peak(footprint, hw, precision, self.offload, self.keep_fp32, self.chunked)
        return dataclasses.replace(
            self,
            precision=precision,
            compute_dtype=_compute_dtype(precision, hw, footprint),
            predicted_peak_bytes=peak,
            reason=f"fallback from {self.precision}: {why}",
            fallbacks=(*self.fallbacks, f"{self.precision}: {why}"),
        )

    def labels(self) -> dict[str, str]:
        """The plan as Prometheus label values."""
        return {
            "precision": self.precision,
            "compute_dtype": self.compute_dtype,
            "keep_fp32": ",".join(self.keep_fp32),
            "offload": self.offload,
            "requested": self.requested,
            "fallbacks": str(len(self.fallbacks)),
        }


def _compute_dtype(precision: str, hw: Hardware, fp: Footprint) -> str:
    """The dtype a precision computes in.

    Quantized storage computes in the half precision auto would pick: BF16 for BF16-trained models on
    hardware that has it, else FP16 (three more mantissa bits than BF16).
    """
    if precision in COMPUTE_DTYPE:
        return COMPUTE_DTYPE[precision]
    return "bfloat16" if hw.bf16 and fp.trained_in_bf16 else "float16"


def predict_peak(
    fp: Footprint,
    hw: Hardware,
    precision: str,
    offload: str = "none",
    keep_fp32: Sequence[str] = (),
    chunked: bool = False,
) -> int:
    """Predict the device peak of a plan before loading.

    Weights are params x bytes-per-param, with modules matching keep_fp32 at 4 bytes and, in quantized
    plans, modules matching quantize_skip at the compute dtype's width; activations scale with the
    compute dtype's width, and so do the copies FP8 storage casts to run; a CUDA context is added on
    GPUs. Offloaded plans take the largest of the footprint's phases (resident weights, each at the
    width the plan holds it at (Resident), + that stage's activations), or, without phases, keep a
    share of the weights off the device.
    """
    compute = _compute_dtype(precision, hw, fp)
    width = 4 if compute == "float32" else 2
    held = fp.whole.get(precision if precision in QUANTIZED else "")
    weights = held.weight_bytes(precision, compute) if held else fp.params * BYTES_PER_PARAM[precision]
    weights += fp.buffer_bytes
    for name, count in fp.module_params:
        if keep_fp32 and any(re.search(p, name) for p in keep_fp32):
            weights += count * (4 - BYTES_PER_PARAM[precision])
        elif precision in QUANTIZED and any(re.search(p, name) for p in fp.quantize_skip):
            weights += count * (width - BYTES_PER_PARAM[precision])
    cast = width if precision == "fp8" else 0  # bytes of each parameter FP8 storage casts to run
    if offload != "none" and fp.phases:
        # The resident weights are part of each phase's figure.
        weights, activations = (
            fp.buffer_bytes,
            max(
                phase.weights(offload, precision).weight_bytes(precision, compute)
                + phase.activation_bytes * width / 2
                + phase.fp8_cast_params.get(offload, 0) * cast
                for phase in fp.phases
            ),
        )
    else:
        if offload == "model":
            weights *= 1.0 - fp.offloadable_fraction
        elif offload in ("sequential", "group"):
            weights = fp.largest_layer_params * BYTES_PER_PARAM[precision] * 2 + fp.buffer_bytes
        plain = fp.chunked_activation_bytes if chunked and offload == "none" else fp.activation_bytes
        activations = plain * width / 2 + fp.fp8_cast_params * cast
    if precision in QUANTIZED:
        workspace = QUANTIZED_WORKSPACE_PER_PARAM[precision] * fp.workspace_copies
        activations += fp.largest_linear_params * workspace
    context = CUDA_CONTEXT_BYTES if hw.is_cuda else 0
    return int(weights + activations + context)


def _refusal(precision: str, hw: Hardware, policy: Policy) -> str | None:
    """Why an explicit precision cannot run here, or None."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose one of auto, {', '.join(PRECISIONS)}"
    if precision == "fp8" and hw.is_cuda and not hw.fp8:
        return f"fp8 needs compute capability 8.9 or higher; {hw.device} has {hw.compute_capability}"
    if precision == "bf16" and not hw.bf16:
        return f"bf16 is not supported on {hw.device}"
    if precision in ("fp8", "int8", "int4") and precision not in policy.quantized_backends:
        return f"{precision} needs a quantization backend that is not installed (torchao; for int4 also mslk)"
    if precision == "int4" and not hw.is_cuda:
        return "int4 runs only on CUDA devices (torchao int4 kernels)"
    return None


def auto_candidates(fp: Footprint, hw: Hardware, policy: Policy) -> list[str]:
    """Precisions in the order auto tries them: most faithful first (DESIGN.md section 3)."""
    if not hw.is_cuda:
        order = ["fp32", "bf16"] if hw.bf16 else ["fp32"]
        return order
    half = ["bf16", "fp16"] if (hw.bf16 and fp.trained_in_bf16) else ["fp16"]
    if hw.bf16 and "bf16" not in half:
        half.append("bf16")
    quant = ["fp8", "int8"] if hw.fp8 else ["int8"]
    quant = [q for q in quant if q in policy.quantized_backends]
    return ["fp32", *half, *quant]


def _offload_modes(policy: Policy) -> list[str]:
    if not policy.supports_offload:
        return ["none"]
    if policy.offload == "auto":
        return list(OFFLOAD_MODES)
    return [policy.offload]


def _placements(fp: Footprint, policy: Policy) -> list[tuple[str, bool]]:
    """(offload, chunked) in the order auto tries them: the memory-saving knobs before offloading."""
    placements = []
    for offload in _offload_modes(policy):
        placements.append((offload, False))
        if offload == "none" and 0 < fp.chunked_activation_bytes < fp.activation_bytes:
            placements.append(("none", True))
    return placements


def resolve_plan(fp: Footprint, hw: Hardware, policy: Policy) -> PrecisionPlan:
    """Resolve a policy into the plan the server will load.

    Args:
        fp: The model's predicted footprint.
        hw: The device.
        policy: The operator's settings.

    Returns:
        The most faithful plan whose predicted peak fits the budget (auto), or the explicit one.

    Raises:
        PlanError: An explicit choice that this hardware cannot run, or nothing fits the budget.
    """
    if policy.offload != "auto" and policy.offload not in OFFLOAD_MODES:
        raise PlanError(f"unknown offload mode {policy.offload!r}; choose auto or one of {OFFLOAD_MODES}")
    if policy.offload not in ("auto", "none") and not policy.supports_offload:
        raise PlanError(f"offload={policy.offload} is not supported by this server")
    for pattern in policy.keep_fp32:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PlanError(f"keep_fp32 pattern {pattern!r} is not a regular expression: {exc}") from exc
    budget = policy.budget_bytes if policy.budget_bytes is not None else hw.total_bytes
    if policy.budget_bytes is not None and policy.budget_bytes > hw.total_bytes:
        raise PlanError(
            f"vram_budget {format_bytes(policy.budget_bytes)} exceeds {hw.device}'s "
            f"{format_bytes(hw.total_bytes)}"
        )
    if policy.precision == "auto":
        candidates = auto_candidates(fp, hw, policy)
    else:
        why = _refusal(policy.precision, hw, policy)
        if why:
            raise PlanError(why)
        candidates = [policy.precision]
    tried = []
    for offload, chunked in _placements(fp, policy):
        for precision in candidates:
            if offload != "none" and precision not in policy.offload_precisions:
                tried.append(f"{precision}/{offload}: cannot be offloaded")
                continue
            peak = predict_peak(fp, hw, precision, offload, policy.keep_fp32, chunked)
            tried.append(f"{precision}/{offload}{'+chunked' if chunked else ''}: {format_bytes(peak)}")
            if peak <= budget:
                return PrecisionPlan(
                    precision=precision,
                    compute_dtype=_compute_dtype(precision, hw, fp),
                    keep_fp32=tuple(policy.keep_fp32),
                    offload=offload,
                    chunked=chunked,
                    predicted_peak_bytes=peak,
                    budget_bytes=policy.budget_bytes,
                    requested=policy.precision,
                    reason=_reason(policy, precision, offload, peak, budget, chunked),
                )
    raise PlanError(
        f"no plan fits the budget of {format_bytes(budget)} on {hw.device}; predicted peaks: "
        + "; ".join(tried)
    )


def _reason(
    policy: Policy, precision: str, offload: str, peak: int, budget: int, chunked: bool = False
) -> str:
    how = "as requested" if policy.precision != "auto" else "most faithful precision that fits"
    where = (
        f" with {offload} offload" if offload != "none" else (" with memory-saving knobs" if chunked else "")
    )
    return f"{precision}{where}, {how}: predicted peak {format_bytes(peak)} of {format_bytes(budget)}"


def fallback_chain(plan: PrecisionPlan, policy: Policy, hw: Hardware) -> list[str]:
    """Precisions to try, in order, if `plan` fails to load or produces non-finite values."""
    if not policy.allow_fallback:
        return []
    order = list(FALLBACK_ORDER)
    start = order.index(plan.precision) + 1 if plan.precision in order else 0
    return [p for p in order[start:] if p != "bf16" or hw.bf16]
