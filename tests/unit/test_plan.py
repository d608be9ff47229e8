"""Plan resolution is a pure function of (footprint, hardware, policy): every branch, table-driven."""

import dataclasses

import pytest

from vram.plan import (
    CUDA_CONTEXT_BYTES,
    QUANTIZED_WORKSPACE_PER_PARAM,
    Footprint,
    Hardware,
    Phase,
    PlanError,
    Policy,
    Resident,
    auto_candidates,
    fallback_chain,
    predict_peak,
    resolve_plan,
)
from vram.sizes import format_bytes, parse_bytes

GiB = 2**30
H200 = Hardware("cuda:0", 141 * GiB, (9, 0), bf16=True)
L4 = Hardware("cuda:0", 24 * GiB, (8, 9), bf16=True)
A10 = Hardware("cuda:0", 24 * GiB, (8, 6), bf16=True)
T4 = Hardware("cuda:0", 16 * GiB, (7, 5), bf16=False)
CPU = Hardware("cpu", 24 * GiB)
BIG_CPU = Hardware("cpu", 64 * GiB)
GLM = Footprint(params=6_244_000_000, activation_bytes=1 * GiB, trained_in_bf16=True)
SVD = Footprint(
    params=2_255_000_000,
    activation_bytes=5 * GiB,
    offloadable_fraction=0.32,
    largest_layer_params=120_000_000,
)


@pytest.mark.parametrize(
    ("fp", "hw", "policy", "expected"),
    [
        # auto: FP32 when it fits and the device is a CPU
        (GLM, BIG_CPU, Policy(), ("fp32", "float32", "none")),
        # ... BF16 on a CPU whose memory FP32 would not fit
        (GLM, CPU, Policy(), ("bf16", "bfloat16", "none")),
        # auto on a GPU: FP32 when it fits the budget
        (GLM, H200, Policy(), ("fp32", "float32", "none")),
        # ... BF16 before FP16 for a BF16-trained model when FP32 does not fit
        (GLM, H200, Policy(budget_bytes=16 * GiB), ("bf16", "bfloat16", "none")),
        # ... FP16 first for a model not trained in BF16
        (
            Footprint(params=6_244_000_000, activation_bytes=GiB),
            H200,
            Policy(budget_bytes=16 * GiB),
            ("fp16", "float16", "none"),
        ),
        # ... FP16 on a GPU without BF16
        (GLM, T4, Policy(budget_bytes=15 * GiB), ("fp16", "float16", "none")),
        # ... FP8 on compute capability >= 8.9 when half precision does not fit
        (GLM, L4, Policy(budget_bytes=10 * GiB), ("fp8", "bfloat16", "none")),
        # ... INT8 below 8.9
        (GLM, A10, Policy(budget_bytes=10 * GiB), ("int8", "bfloat16", "none")),
        # ... INT8 computes in FP16 where BF16 is missing
        (GLM, T4, Policy(budget_bytes=10 * GiB), ("int8", "float16", "none")),
        # ... then offload (video): every precision tried without offload first
        (SVD, H200, Policy(budget_bytes=7.5 * GiB, supports_offload=True), ("fp8", "float16", "model")),
        # ... and layer-wise offload when model offload is not enough
        (SVD, H200, Policy(budget_bytes=6 * GiB, supports_offload=True), ("fp8", "float16", "group")),
        # explicit choices are honoured
        (GLM, H200, Policy(precision="fp16"), ("fp16", "float16", "none")),
        (
            SVD,
            H200,
            Policy(precision="fp16", offload="sequential", supports_offload=True),
            ("fp16", "float16", "sequential"),
        ),
        (GLM, CPU, Policy(precision="bf16"), ("bf16", "bfloat16", "none")),
    ],
)
def test_resolution(fp, hw, policy, expected):
    plan = resolve_plan(fp, hw, policy)
    assert (plan.precision, plan.compute_dtype, plan.offload) == expected
    assert plan.predicted_peak_bytes <= (policy.budget_bytes or hw.total_bytes)
    assert plan.reason


@pytest.mark.parametrize(
    ("hw", "policy", "message"),
    [
        (A10, Policy(precision="fp8"), "compute capability 8.9"),
        (T4, Policy(precision="bf16"), "bf16 is not supported"),
        (H200, Policy(precision="int8", quantized_backends=frozenset()), "torchao"),
        (H200, Policy(precision="int4", quantized_backends=frozenset({"int8", "fp8"})), "mslk"),
        (CPU, Policy(precision="int4"), "CUDA"),
        (H200, Policy(precision="fp32", budget_bytes=8 * GiB), "no plan fits"),
        (H200, Policy(budget_bytes=2 * GiB), "no plan fits"),
        (H200, Policy(budget_bytes=200 * GiB), "exceeds"),
        (H200, Policy(offload="model"), "not supported by this server"),
        (H200, Policy(offload="sideways", supports_offload=True), "unknown offload"),
        (H200, Policy(keep_fp32=("(",)), "regular expression"),
    ],
)
def test_refusals(hw, policy, message):
    with pytest.raises(PlanError, match=message):
        resolve_plan(GLM, hw, policy)


def test_refusal_lists_the_predictions():
    with pytest.raises(PlanError) as info:
        resolve_plan(GLM, H200, Policy(budget_bytes=2 * GiB))
    assert "fp32/none" in str(info.value) and "int8/none" in str(info.value)


def test_auto_order():
    assert auto_candidates(GLM, H200, Policy()) == ["fp32", "bf16", "fp16", "fp8", "int8"]
    assert auto_candidates(SVD, H200, Policy()) == ["fp32", "fp16", "bf16", "fp8", "int8"]
    assert auto_candidates(GLM, T4, Policy()) == ["fp32", "fp16", "int8"]
    assert auto_candidates(GLM, CPU, Policy()) == ["fp32", "bf16"]


def test_prediction_counts_weights_activations_and_context():
    fp = Footprint(params=1000, buffer_bytes=10, activation_bytes=200)
    assert predict_peak(fp, CPU, "fp32") == 4000 + 10 + 400
    assert predict_peak(fp, CPU, "fp16") == 2000 + 10 + 200
    assert predict_peak(fp, CPU, "int8") == 1000 + 10 + 200
    assert predict_peak(fp, H200, "fp16") == 2000 + 10 + 200 + CUDA_CONTEXT_BYTES


def test_quantized_plans_price_the_dequantized_copy_of_their_largest_linear():
    fp = Footprint(params=1000, activation_bytes=200, largest_linear_params=100)
    assert predict_peak(fp, CPU, "fp16") == 2000 + 200  # only quantized plans dequantize
    assert predict_peak(fp, CPU, "int8") == 1000 + 200 + 100 * QUANTIZED_WORKSPACE_PER_PARAM["int8"]
    assert predict_peak(fp, CPU, "fp8") == 1000 + 200 + 100 * QUANTIZED_WORKSPACE_PER_PARAM["fp8"]


def test_fallback_order():
    plan = resolve_plan(GLM, H200, Policy(precision="fp16"))
    assert fallback_chain(plan, Policy(), H200) == ["bf16", "fp32"]
    assert fallback_chain(plan, Policy(), T4) == ["fp32"]
    assert fallback_chain(plan, Policy(allow_fallback=False), H200) == []
    bf16 = plan.with_fallback("bf16", "non-finite warm-up", GLM, H200)
    assert bf16.precision == "bf16" and bf16.fallbacks == ("fp16: non-finite warm-up",)
    assert fallback_chain(bf16, Policy(), H200) == ["fp32"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("12GiB", 12 * GiB), ("800MB", 800_000_000), ("1.5G", 1_500_000_000), ("1024", 1024), ("", None)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="not a byte size"):
        parse_bytes("12 parsecs")
    assert format_bytes(12 * GiB) == "12.0 GiB"


def test_prediction_prices_fp32_islands_and_unquantized_modules():
    fp = Footprint(params=1000, module_params=(("body", 900), ("lm_head", 100)), quantize_skip=("lm_head",))
    assert predict_peak(fp, CPU, "fp16", keep_fp32=("lm_head",)) == 900 * 2 + 100 * 4
    assert predict_peak(fp, CPU, "int8") == 900 * 1 + 100 * 2  # lm_head stays in bf16
    assert predict_peak(fp, CPU, "fp32", keep_fp32=("lm_head",)) == 4000


def test_offloaded_plans_take_their_largest_phase():
    phases = (
        Phase("encode", 0, {"model": (300, 0), "group": (50, 40)}),
        Phase("denoise", 400, {"model": (1000, 0), "group": (50, 40)}),
        Phase("decode", 900, {"model": (0, 40), "group": (0, 40)}),
    )
    fp = Footprint(params=1340, buffer_bytes=10, activation_bytes=2000, phases=phases)
    # fp8 stores 1 byte a parameter, the VAE-like component stays at the compute width (2 bytes)
    assert predict_peak(fp, CPU, "fp8", "model") == 10 + max(300, 1000 + 400, 80 + 900)
    assert predict_peak(fp, CPU, "fp16", "model") == 10 + max(600, 2000 + 400, 80 + 900)
    assert predict_peak(fp, CPU, "fp16", "group") == 10 + max(100 + 80, 100 + 80 + 400, 80 + 900)
    # without offload, the phases play no part: all weights + the relaxed activations
    assert predict_peak(fp, CPU, "fp16") == 2680 + 10 + 2000


def test_phases_price_each_parameter_at_the_width_the_plan_holds_it_at():
    """FP32 islands at 4 bytes under FP16 only; a quantized plan's own split, its unquantized rest at the
    compute width; a quantized precision without a split of its own stores the plain figures."""
    encode = Phase("encode", 0, {"model": Resident(600, 0, 100)}, {"fp8": {"model": Resident(400, 200, 100)}})
    fp = Footprint(params=700, phases=(encode,))
    assert predict_peak(fp, CPU, "fp16", "model") == 600 * 2 + 100 * 4
    assert predict_peak(fp, CPU, "bf16", "model") == 700 * 2
    assert predict_peak(fp, CPU, "fp32", "model") == 700 * 4
    assert predict_peak(fp, CPU, "fp8", "model") == 400 + 200 * 2 + 100 * 4  # computes in FP16
    bf16_trained = dataclasses.replace(fp, trained_in_bf16=True)
    assert predict_peak(bf16_trained, CPU, "fp8", "model") == 400 + 300 * 2  # computes in BF16
    assert predict_peak(fp, CPU, "int8", "model") == 600 + 100 * 4
    assert predict_peak(fp, CPU, "fp16", "group") == 0  # a mode the phase does not describe holds nothing


@pytest.mark.parametrize(
    ("visible", "index", "expected"),
    [
        (None, 1, 1),  # every GPU visible: the numbering is NVML's
        ("2,3", 0, 2),
        ("2,3", 1, 3),
        ("GPU-bbbb", 0, 1),  # UUIDs, as Kubernetes' device plugin writes them
        ("bbbb", 0, 1),  # torch-style, without the prefix
    ],
)
def test_nvml_index_honours_cuda_visible_devices(monkeypatch, visible, index, expected):
    from vram.monitor import nvml_index

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_index(index, lambda: ["GPU-aaaa", "GPU-bbbb-1234"]) == expected


def test_nvml_index_refuses_an_unknown_uuid(monkeypatch):
    from vram.monitor import nvml_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc")
    with pytest.raises(LookupError, match="GPU-cccc"):
        nvml_index(0, lambda: ["GPU-aaaa"])


def test_auto_tries_the_memory_saving_knobs_before_offloading():
    """A footprint whose chunked activations fit is planned without offload, chunked."""
    hw = Hardware("cuda:0", 141 * GiB, (9, 0), bf16=True)
    phase = Phase("denoise", 2 * GiB, {"model": (10**9, 0), "group": (10**8, 0), "sequential": (10**8, 0)})
    fp = Footprint(
        params=2 * 10**9, activation_bytes=8 * GiB, chunked_activation_bytes=2 * GiB, phases=(phase,)
    )
    plan = resolve_plan(fp, hw, Policy(budget_bytes=7 * GiB, supports_offload=True))
    assert (plan.precision, plan.offload, plan.chunked) == ("fp16", "none", True)
    assert "memory-saving knobs" in plan.reason
    assert plan.predicted_peak_bytes == predict_peak(fp, hw, "fp16", "none", (), chunked=True)
    # without the knobs' saving, the same budget needs offload
    plain = dataclasses.replace(fp, chunked_activation_bytes=0)
    assert resolve_plan(plain, hw, Policy(budget_bytes=7 * GiB, supports_offload=True)).offload == "model"
    # and the refusal lists the chunked tier between the plain and the offloaded ones
    with pytest.raises(PlanError, match=r"fp16/none: .*fp16/none\+chunked: .*fp16/model"):
        resolve_plan(fp, hw, Policy(budget_bytes=GiB, supports_offload=True))


def test_precisions_that_cannot_be_offloaded_are_never_planned_with_offload():
    hw = Hardware("cuda:0", 141 * GiB, (9, 0), bf16=True)
    phase = Phase("denoise", GiB, {"model": (10**9, 0), "group": (10**8, 0), "sequential": (10**8, 0)})
    fp = Footprint(params=4 * 10**9, activation_bytes=GiB, phases=(phase,))
    policy = Policy(budget_bytes=3 * GiB, supports_offload=True, quantized_backends=frozenset({"int8"}))
    plan = resolve_plan(fp, hw, policy)
    assert (plan.precision, plan.offload) == ("int8", "model")
    movable = dataclasses.replace(policy, offload_precisions=frozenset({"fp32", "fp16", "bf16"}))
    plan = resolve_plan(fp, hw, movable)
    assert (plan.precision, plan.offload) == ("fp16", "group")  # int8 only without offload
    with pytest.raises(PlanError, match=r"int8/model: cannot be offloaded"):
        resolve_plan(fp, hw, dataclasses.replace(movable, precision="int8"))
    assert resolve_plan(fp, hw, dataclasses.replace(movable, budget_bytes=8 * GiB)).offload == "none"


def test_fallback_skips_precisions_predicted_over_the_budget():
    from vram.loader import load_with_fallback

    fp = Footprint(params=10**9)
    policy = Policy(budget_bytes=int(2.5 * 10**9))
    plan = resolve_plan(fp, CPU, dataclasses.replace(policy, precision="fp16"))
    loaded: list[str] = []

    def load(p: object) -> str:
        loaded.append(p.precision)  # type: ignore[attr-defined]
        raise RuntimeError("does not load")

    with pytest.raises(RuntimeError, match=r"no precision loads within the budget .*fp32: predicted 3.7 GiB"):
        load_with_fallback(load, lambda m: None, plan, policy, CPU, fp)
    assert loaded == ["fp16", "bf16"]  # fp32 (4 GB) is predicted over the 2.5 GB budget: never loaded
