"""The LLM engine on the tiny GLM, on CPU: precision plans, streaming, sampling, stops, batching."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llm_server import footprint, fusion
from llm_server.engine import LlmEngine, LlmEngineConfig
from llm_server.generation import Finished, GenerationRequest, TextDelta
from llm_server.sampling import SamplingParams, make_generator, next_token, sample_batch
from llm_server.slots import SlotCache
from llm_server.stops import TextStream
from serving.errors import Cancelled, InvalidArgument, NonFiniteOutput, NotReady, ResourceExhausted
from tiny_models.llm import build_llm, build_overflow_llm
from vram import apply
from vram.plan import Policy

PROMPTS = [
    "The mountain bike",
    "A quiet lake at dawn, and the camera moves slowly over the water while",
    "Scene one:",
    "Write a short script about a kitchen on a winter evening.",
    "Numbers: 1, 2, 3,",
    "She walked to the station and",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_overflow_llm(tmp_path_factory.mktemp("llm-overflow"))


def load(model_dir: Path, policy: Policy | None = None, **kwargs: Any) -> LlmEngine:
    config = LlmEngineConfig(model_dir=model_dir, device="cpu", policy=policy or Policy(), **kwargs)
    return LlmEngine.load(config)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[LlmEngine]:
    eng = load(model_dir)
    yield eng
    eng.close()


def never() -> bool:
    return False


def run(engine: LlmEngine, request: GenerationRequest, should_stop: Callable[[], bool] = never):
    """(deltas, finished) of one generation."""
    events = list(engine.generate(engine.validate(request), should_stop))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[-1], Finished)
    return deltas, events[-1]


def text_of(engine: LlmEngine, request: GenerationRequest) -> str:
    return "".join(run(engine, request)[0])


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# -- the tiny model and loading -----------------------------------------------------------------------
def test_tiny_model_overflows_in_fp16_only(overflow_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(overflow_dir)
    ids = tokenizer("A quiet lake at dawn", return_tensors="pt")["input_ids"]
    for dtype, finite in [(torch.float32, True), (torch.bfloat16, True), (torch.float16, False)]:
        model = AutoModelForCausalLM.from_pretrained(overflow_dir, dtype=dtype, use_safetensors=True)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # weights fit every dtype
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        assert bool(torch.isfinite(logits).all()) is finite, dtype


def test_engine_describes_the_model(engine: LlmEngine, model_dir: Path) -> None:
    model_config = AutoModelForCausalLM.from_pretrained(model_dir).config
    assert engine.architecture == "GlmForCausalLM"
    assert engine.max_context_tokens == model_config.max_position_embeddings == 2048
    assert engine.plan.precision == "fp32" and engine.plan.requested == "auto"  # auto on CPU: FP32
    assert engine.parameter_count == footprint.count_parameters(model_config)[0]
    assert engine.monitor.weights_bytes == apply.weights_bytes([engine.model])
    labels = {"model": engine.model_name, "precision": "fp32"}
    assert metric("scriptreel_model_weights_bytes", labels) == engine.monitor.weights_bytes


def test_kv_prediction_matches_a_real_cache(engine: LlmEngine) -> None:
    cache = DynamicCache(config=engine.model.config)
    with torch.inference_mode():
        engine.model(
            input_ids=torch.tensor([[1, 40, 41, 42, 43]], device=engine.model.device),
            cache=cache,
            use_cache=True,
        )
    layers: list[Any] = list(cache.layers)
    stored = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    assert stored == 5 * footprint.kv_bytes_per_token(engine.model.config, width=4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_halves_the_weights(model_dir: Path, engine: LlmEngine, precision: str) -> None:
    half = load(model_dir, policy=Policy(precision=precision), max_batch_size=2)
    try:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        assert {p.dtype for p in half.model.parameters()} == {dtype}
        assert half.plan.precision == precision and half.plan.compute_dtype == str(dtype).split(".")[1]
        # Parameters halve exactly; the rotary inv_freq buffer stays FP32 in both (transformers keeps it).
        buffers = sum(b.numel() * b.element_size() for b in half.model.buffers())
        assert buffers == sum(b.numel() * b.element_size() for b in engine.model.buffers()) > 0
        assert (
            2 * (apply.weights_bytes([half.model]) - buffers) == apply.weights_bytes([engine.model]) - buffers
        )
        _, finished = run(half, GenerationRequest(prompt="The mountain bike", max_new_tokens=8))
        assert finished.completion_tokens >= 1
    finally:
        half.close()


def test_keep_fp32_leaves_lm_head_in_fp32(model_dir: Path) -> None:
    mixed = load(model_dir, policy=Policy(precision="bf16", keep_fp32=("lm_head",)), max_batch_size=2)
    try:
        dtypes = {name: p.dtype for name, p in mixed.model.named_parameters()}
        assert dtypes.pop("lm_head.weight") == torch.float32
        assert set(dtypes.values()) == {torch.bfloat16}
        assert run(mixed, GenerationRequest(prompt="Scene one:", max_new_tokens=6))[1].completion_tokens >= 1
    finally:
        mixed.close()


def test_int8_stores_linears_quantized_except_lm_head(model_dir: Path, engine: LlmEngine) -> None:
    quantized = load(model_dir, policy=Policy(precision="int8"), max_batch_size=2)
    try:
        assert quantized.plan.precision == "int8" and quantized.plan.compute_dtype == "float16"
        assert type(quantized.model.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
        assert quantized.model.lm_head.weight.dtype == torch.float16  # never quantized (engine.QUANTIZE_SKIP)
        assert quantized.monitor.weights_bytes < apply.weights_bytes([engine.model]) / 2
        assert (
            run(quantized, GenerationRequest(prompt="Scene one:", max_new_tokens=4))[1].completion_tokens >= 1
        )
    finally:
        quantized.close()


def test_fp16_overflow_falls_back_to_bf16(overflow_dir: Path) -> None:
    labels = {"from_precision": "fp16", "to_precision": "bf16"}
    before = metric("scriptreel_precision_fallbacks_total", labels)
    eng = load(overflow_dir, policy=Policy(precision="fp16"), max_batch_size=2)
    try:
        assert eng.plan.precision == "bf16" and eng.plan.requested == "fp16"
        assert len(eng.plan.fallbacks) == 1 and eng.plan.fallbacks[0].startswith("fp16: WarmupFailed")
        assert metric("scriptreel_precision_fallbacks_total", labels) == before + 1
        assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
        assert run(eng, GenerationRequest(prompt="Scene one:", max_new_tokens=5))[1].completion_tokens >= 1
    finally:
        eng.close()


def test_fp16_overflow_without_fallback_refuses_to_start(overflow_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="no fallback left"):
        load(overflow_dir, policy=Policy(precision="fp16", allow_fallback=False))


def test_nonfinite_logits_at_run_time_fail_the_request(overflow_dir: Path) -> None:
    eng = load(overflow_dir, policy=Policy(precision="bf16"), max_batch_size=2)
    try:
        eng.model.half()  # the real FP16 overflow, after the warm-up passed in BF16
        before = metric("scriptreel_nonfinite_outputs_total", {"device": "cpu"})
        for _ in range(2):  # the engine stays up: a second request fails the same way
            with pytest.raises(NonFiniteOutput, match="non-finite logits"):
                run(eng, GenerationRequest(prompt="Scene one:", max_new_tokens=5))
        assert metric("scriptreel_nonfinite_outputs_total", {"device": "cpu"}) == before + 2
    finally:
        eng.close()


# -- generation ------------------------------------------------------------------------------------------
def test_greedy_stream_matches_transformers_generate(engine: LlmEngine, model_dir: Path) -> None:
    prompt = PROMPTS[1]
    deltas, finished = run(engine, GenerationRequest(prompt=prompt, max_new_tokens=24))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(model_dir).generate(
        ids, max_new_tokens=24, do_sample=False, eos_token_id=None
    )[0, ids.shape[1] :]
    assert len(deltas) > 1
    assert finished.finish_reason == "length"
    assert finished.prompt_tokens == ids.shape[1]
    assert finished.completion_tokens == 24
    assert "".join(deltas) == tokenizer.decode(reference, skip_special_tokens=True)


def test_chat_messages_use_the_template(engine: LlmEngine) -> None:
    prepared = engine.validate(GenerationRequest(messages=[("system", "Be brief."), ("user", "A teaser?")]))
    rendered = str(
        engine.tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A teaser?"}],
            add_generation_prompt=True,
            tokenize=False,
        )
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    assert list(prepared.input_ids) == engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prepared.max_new_tokens == 256  # the default when 0


def test_greedy_and_seeded_sampling_are_deterministic(engine: LlmEngine) -> None:
    greedy = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=16)
    assert text_of(engine, greedy) == text_of(engine, greedy)
    sampled: dict[str, Any] = {
        "prompt": PROMPTS[0],
        "max_new_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 200,
    }
    first = text_of(engine, GenerationRequest(**sampled, seed=1234))
    assert first == text_of(engine, GenerationRequest(**sampled, seed=1234))
    others = {text_of(engine, GenerationRequest(**sampled, seed=s)) for s in (1, 2, 3)}
    assert len(others | {first}) > 1
    assert first != text_of(engine, greedy)


def test_stop_sequence_ends_the_text_before_it(engine: LlmEngine) -> None:
    full = text_of(engine, GenerationRequest(prompt=PROMPTS[2], max_new_tokens=30))
    stop = full[10:14]
    deltas, finished = run(engine, GenerationRequest(prompt=PROMPTS[2], max_new_tokens=30, stop=[stop, "§"]))
    assert "".join(deltas) == full[: full.find(stop)]
    assert finished.finish_reason == "stop_sequence"
    assert finished.completion_tokens < 30


def test_text_stream_never_splits_characters_or_leaks_a_stop(engine: LlmEngine) -> None:
    tokenizer = engine.tokenizer
    text = "Ride to the summit 🚵, über die Wolken, then stop here please."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(i: Sequence[int]) -> str:
        return str(tokenizer.decode(list(i), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    plain = TextStream(decode)
    deltas = [plain.push(i)[0] for i in ids] + [plain.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    stopping = TextStream(decode, stop=["stop here"])
    out, stopped = [], False
    for i in ids:
        delta, stopped = stopping.push(i)
        out.append(delta)
        assert "stop" not in "".join(out)
        if stopped:
            break
    assert stopped and "".join(out) == "Ride to the summit 🚵, über die Wolken, then "


# -- validation ------------------------------------------------------------------------------------------
def test_validation_reports_every_violation(engine: LlmEngine) -> None:
    with pytest.raises(InvalidArgument) as err:
        engine.validate(
            GenerationRequest(
                prompt="hi", temperature=2.5, top_p=1.5, top_k=-1, max_new_tokens=5000, stop=["x"] * 9
            )
        )
    fields = {v.field for v in err.value.violations}
    assert fields == {"temperature", "top_p", "top_k", "max_new_tokens", "stop"}
    with pytest.raises(InvalidArgument, match="stop\\[1\\]"):
        engine.validate(GenerationRequest(prompt="hi", stop=["ok", "y" * 65]))
    for bad, field in [
        (GenerationRequest(), "prompt"),
        (GenerationRequest(prompt="hi", messages=[("user", "hi")]), "messages"),
        (GenerationRequest(messages=[("user", "hi"), ("robot", "beep")]), "messages[1].role"),
        (GenerationRequest(prompt="hi", json_schema="{not json"), "json_schema"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            engine.validate(bad)
        assert [v.field for v in err.value.violations] == [field]


def test_context_overflow_is_invalid_argument(engine: LlmEngine) -> None:
    prompt = "the camera moves " * 400
    tokens = len(engine.tokenizer(prompt)["input_ids"])
    assert 1024 < tokens < 2048
    with pytest.raises(InvalidArgument) as err:
        engine.validate(GenerationRequest(prompt=prompt, max_new_tokens=1024))
    [violation] = err.value.violations
    assert violation.field == "prompt"
    assert f"prompt is {tokens} tokens; the model's context is 2048" in violation.description
    assert engine.validate(GenerationRequest(prompt=prompt)).max_new_tokens == min(256, 2048 - tokens)
    with pytest.raises(InvalidArgument, match="context is 2048"):
        engine.validate(GenerationRequest(prompt=prompt * 2))


# -- continuous batching ------------------------------------------------------------------------------
def concurrently(
    engine: LlmEngine, requests: list[GenerationRequest], stops: list[Callable[[], bool]] | None = None
):
    """Run requests on threads at once; returns (results, highest batch size seen)."""
    results: list[object] = [None] * len(requests)
    stops = stops or [never] * len(requests)

    def consume(i: int) -> None:
        try:
            results[i] = "".join(
                e.text
                for e in engine.generate(engine.validate(requests[i]), stops[i])
                if isinstance(e, TextDelta)
            )
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    highest = 0.0
    while any(t.is_alive() for t in threads):
        highest = max(highest, metric("scriptreel_llm_batch_size"))
        time.sleep(0.0005)
    for t in threads:
        t.join()
    return results, highest


def test_batched_greedy_equals_solo(engine: LlmEngine) -> None:
    requests = [
        GenerationRequest(prompt=p, max_new_tokens=n)
        for p, n in zip(PROMPTS, (60, 9, 40, 17, 33, 25), strict=True)
    ]
    solo = [text_of(engine, r) for r in requests]
    batched, highest = concurrently(engine, requests)
    assert highest >= 2
    assert batched == solo


def test_cancelling_one_leaves_the_others_correct(engine: LlmEngine) -> None:
    requests = [GenerationRequest(prompt=p, max_new_tokens=40) for p in PROMPTS[:3]]
    solo = [text_of(engine, r) for r in requests]
    cancel = threading.Event()
    calls = 0

    def stop_after_a_few() -> bool:
        nonlocal calls
        calls += 1
        if calls >= 5:
            cancel.set()
        return cancel.is_set()

    results, _ = concurrently(engine, requests, [never, stop_after_a_few, never])
    assert isinstance(results[1], Cancelled)
    assert [results[0], results[2]] == [solo[0], solo[2]]
    # the engine keeps serving afterwards
    assert text_of(engine, requests[0]) == solo[0]


def test_full_queue_is_resource_exhausted(model_dir: Path) -> None:
    eng = load(model_dir, max_batch_size=1, max_queue=1)
    release = threading.Event()
    long = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=1000)
    try:
        running = eng.generate(eng.validate(long), release.is_set)
        next(running)  # in the batch (its first token is out)
        waiting = threading.Thread(target=concurrently, args=(eng, [long], [release.is_set]))
        waiting.start()
        deadline = time.monotonic() + 5
        while metric("scriptreel_llm_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(ResourceExhausted, match="queue full") as err:
            next(eng.generate(eng.validate(long), never))
        assert err.value.retry_after_s == 1.0
        release.set()
        with pytest.raises(Cancelled):
            list(running)
        waiting.join(5)
        assert not waiting.is_alive()
    finally:
        release.set()
        eng.close()


def test_closing_the_stream_frees_the_slot(model_dir: Path) -> None:
    eng = load(model_dir, max_batch_size=1, max_queue=4)
    try:
        stream = eng.generate(eng.validate(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=1000)), never)
        next(stream)
        stream.close()  # the client went away without cancelling explicitly
        start = time.monotonic()
        assert run(eng, GenerationRequest(prompt=PROMPTS[2], max_new_tokens=5))[1].completion_tokens >= 1
        assert time.monotonic() - start < 2
    finally:
        eng.close()


def test_closing_the_engine_fails_requests_in_flight(model_dir: Path) -> None:
    eng = load(model_dir, max_batch_size=1, max_queue=4)
    long = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=1000)
    running = eng.generate(eng.validate(long), never)
    next(running)
    eng.close()
    with pytest.raises(NotReady, match="shut down"):
        list(running)
    with pytest.raises(NotReady):
        next(eng.generate(eng.validate(long), never))


def test_requests_taken_from_the_queue_fail_when_their_iteration_fails_before_prefill(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error before a joining request reaches prefill (its cache could not be made) fails that
    request at once, instead of leaving its caller waiting; the next request is served."""
    eng = load(model_dir, max_batch_size=2)
    try:
        broken = [True]
        make_cache = eng._scheduler._new_cache

        def new_cache() -> DynamicCache:
            if broken.pop() if broken else False:
                raise RuntimeError("no cache today")
            return make_cache()

        monkeypatch.setattr(eng._scheduler, "_new_cache", new_cache)
        request = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=4)
        outcome: list[BaseException] = []
        thread = threading.Thread(
            target=lambda: outcome.append(_raised(lambda: run(eng, request))), daemon=True
        )
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the request was lost: its caller still waits"
        assert isinstance(outcome[0], RuntimeError) and "no cache today" in str(outcome[0])
        assert len(run(eng, request)[0]) > 0
    finally:
        eng.close()


def _raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


# -- decode slots and chunked prefill -----------------------------------------------------------------
def test_slots_keep_each_row_right_aligned_at_one_column() -> None:
    cache = SlotCache(rows=3, capacity=16, layers=[(2, 4, torch.float32)], device=torch.device("cpu"))

    def row(length: int, fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        states = torch.full((1, 2, length, 4), fill)
        return [(states, -states)]

    cache.add(row(3, 1.0), token=7)
    cache.add(row(5, 2.0), token=8)  # longer: the first row shifts right
    cache.add(row(2, 3.0), token=9)
    assert cache.end == 5 and cache.lengths == [3, 5, 2]
    assert cache.mask[:3, :5].int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    for i, (length, fill) in enumerate([(3, 1.0), (5, 2.0), (2, 3.0)]):
        kept = cache.keys[0][i, :, cache.mask[i]]
        assert kept.shape[1] == length and bool((kept == fill).all())
        assert bool((cache.values[0][i, :, cache.mask[i]] == -fill).all())
    assert cache.inputs.tolist() == [7, 8, 9, 3, 5, 2, 5]  # tokens, positions, write column
    assert cache.open_column() == 6
    cache.advance(torch.tensor([17, 18, 19]))  # a step: next tokens, every row one longer, on the device
    assert cache.end == 6 and cache.lengths == [4, 6, 3]
    assert cache.inputs.tolist() == [17, 18, 19, 4, 6, 3, 6]
    cache.keep([0, 2])  # the longest row leaves: the others shift back, with their next tokens
    assert cache.end == 4 and cache.lengths == [4, 3]
    assert cache.mask[:2, :5].int().tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 0]]
    assert bool((cache.keys[0][1, :, 1:3] == 3.0).all())
    assert cache.inputs[:2].tolist() == [17, 19] and cache.inputs[3:].tolist() == [4, 3, 0, 4]


def test_seeded_sampling_in_a_batch_equals_solo(engine: LlmEngine) -> None:
    requests = [
        GenerationRequest(prompt=p, max_new_tokens=20, temperature=0.9, top_k=50, seed=100 + i)
        for i, p in enumerate(PROMPTS[:4])
    ]
    solo = [text_of(engine, r) for r in requests]
    batched, highest = concurrently(engine, requests)
    assert highest >= 2
    assert batched == solo


LONG_PROMPT = " ".join(PROMPTS * 6)


def test_chunked_prefill_matches_a_whole_prefill(model_dir: Path, engine: LlmEngine) -> None:
    request = GenerationRequest(prompt=LONG_PROMPT, max_new_tokens=24)
    assert engine.validate(request).prompt_tokens > 4 * 16
    chunked = load(model_dir, prefill_chunk=16, max_batch_size=2)
    try:
        assert text_of(chunked, request) == text_of(engine, request)
    finally:
        chunked.close()


@contextlib.contextmanager
def streaming_beside(model_dir: Path, max_batch_size: int) -> Iterator[tuple[LlmEngine, Iterator[Any]]]:
    """An engine prefilling 16 tokens per step, with a long stream already decoding in it."""
    eng = load(model_dir, prefill_chunk=16, max_batch_size=max_batch_size)
    try:
        running = eng.generate(eng.validate(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=1000)), never)
        next(running)
        yield eng, running
        assert next(running)  # the long stream is still decoding
        running.close()
    finally:
        eng.close()


def test_a_long_prefill_does_not_stall_running_streams(model_dir: Path) -> None:
    with streaming_beside(model_dir, max_batch_size=2) as (eng, _running):
        before = metric("scriptreel_llm_generated_tokens_total")
        long = eng.validate(GenerationRequest(prompt=LONG_PROMPT, max_new_tokens=1))
        finished = run_prepared(eng, long)
        # Every prefill chunk of the long prompt was followed by a decoding step of the running stream.
        chunks = -(-long.prompt_tokens // 16)
        assert metric("scriptreel_llm_generated_tokens_total") - before >= chunks - 1
        assert finished.completion_tokens == 1


def test_prompts_queued_for_prefill_while_a_batch_decodes(model_dir: Path) -> None:
    with streaming_beside(model_dir, max_batch_size=6) as (eng, _running):
        # Several prompts longer than a chunk arrive at once: one chunk per step, the others wait
        # with caches not yet started.
        requests = [
            GenerationRequest(prompt=LONG_PROMPT[: 150 + 40 * i], max_new_tokens=12) for i in range(4)
        ]
        solo = [text_of(eng, r) for r in requests]
        results, _ = concurrently(eng, requests)
        assert results == solo


def run_prepared(engine: LlmEngine, prepared: Any) -> Finished:
    events = list(engine.generate(prepared, never))
    assert isinstance(events[-1], Finished)
    return events[-1]


def test_kv_cache_is_allocated_at_start_and_exported(model_dir: Path) -> None:
    eng = load(model_dir, max_batch_size=3, max_context_tokens=256)
    try:
        per_token = footprint.kv_bytes_per_token(eng.model.config, width=4)
        assert metric("scriptreel_llm_kv_cache_bytes") == 3 * 256 * per_token
        assert eng.footprint.activation_bytes >= (3 + 1) * 256 * footprint.kv_bytes_per_token(
            eng.model.config
        )
    finally:
        eng.close()


def test_the_decode_step_measured_at_start_is_exported(model_dir: Path) -> None:
    """0 without CUDA graphs (CPU); on a GPU, the one-row replay the scheduler timed at start."""
    eng = load(model_dir)
    try:
        assert eng._scheduler.replay_ms is None
        assert metric("scriptreel_llm_decode_step_seconds") == 0.0
        eng._scheduler._decode.replay_ms = 3.7  # what a GPU's capture measures
        eng._export_metrics()
        assert metric("scriptreel_llm_decode_step_seconds") == pytest.approx(0.0037)
    finally:
        eng.close()
        eng._scheduler._decode.replay_ms = None
        eng._export_metrics()


class Counted:
    """A callable that counts its calls (spies on the compiled pieces of llm_server.fusion)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function, self.calls = function, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.function(*args, **kwargs)


def test_fused_kernels_run_only_inside_compiled(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    names = fusion.fuse(model, backend="eager")  # dynamo without inductor: same numbers, quick
    try:
        assert names == ["GlmMLP", "GlmRMSNorm", "transformers.models.glm.modeling_glm.apply_rotary_pos_emb"]
        norm = model.model.norm
        norm.forward.fused = spy = Counted(norm.forward.fused)
        with torch.inference_mode():
            assert torch.equal(model(input_ids=ids).logits, reference) and spy.calls == 0  # eager outside
            with fusion.compiled():
                assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-5) and spy.calls == 1
    finally:
        fusion.unfuse(model)
    assert "forward" not in vars(model.model.norm)
    modeling = sys.modules[type(model).__module__]
    assert not hasattr(modeling.apply_rotary_pos_emb, "fused")


def test_static_fusion_compiles_one_row_steps_with_fixed_sizes(model_dir: Path) -> None:
    """Fusion.static: the one-row graphs have no symbolic size; more rows share one dynamic graph."""
    import torch._dynamo

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batches = [torch.tensor([[7 + row] for row in range(rows)]) for rows in (1, 2, 4, 3)]
    with torch.inference_mode():
        references = [model(input_ids=ids).logits for ids in batches]

    def graphs(options: fusion.Fusion) -> list[bool]:
        """Whether each graph compiled for `batches` takes symbolic sizes, in compilation order."""
        symbolic: list[bool] = []

        def backend(graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
            values = [node.meta.get("example_value") for node in graph.graph.find_nodes(op="placeholder")]
            sizes = [size for v in values if isinstance(v, torch.Tensor) for size in v.shape]
            symbolic.append(any(isinstance(x, torch.SymInt) for x in [*inputs, *sizes]))
            return graph.forward

        torch._dynamo.reset()
        fusion.fuse(model, options, backend=backend)
        try:
            with torch.inference_mode(), fusion.compiled():
                for ids, reference in zip(batches, references, strict=True):
                    assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-5)
        finally:
            fusion.unfuse(model)
            torch._dynamo.reset()
        return symbolic

    one_row = fusion.Fusion(linears="one-row", qkv=True, attention="matmul")
    static = graphs(dataclasses.replace(one_row, static=True))
    # norm, MLP, rotary, q/k/v, output projection, LM head at one row (fixed sizes); then norm, MLP and
    # rotary once more for 2, 4 and 3 rows (dynamic in the rows).
    assert static[:6] == [False] * 6 and static[6:] == [True] * 3
    assert all(graphs(one_row))  # dynamic from the start: hidden and weight sizes are symbolic too


COMPILE_ONE_NORM = """
import json, torch
from llm_server import fusion
norm = torch.compile(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
norm(torch.randn(2, 64))
print(json.dumps([fusion.inductor_cache_counts(), fusion.inductor_cache_dir()]))
"""


@pytest.mark.slow
def test_a_second_process_loads_compiled_pieces_from_the_shared_inductor_cache(tmp_path: Path) -> None:
    """What the capture log counts, and what bench.llm relies on to run the server's kernels in-process."""
    import os
    import subprocess

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def counts() -> tuple[list[int], str]:
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_ONE_NORM], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        found, where = json.loads(done.stdout.splitlines()[-1])
        return found, where

    assert counts() == ([0, 1], str(tmp_path / "inductor"))  # compiled, and written to the cache
    assert counts() == ([1, 0], str(tmp_path / "inductor"))  # loaded, kernels and tuning included


def test_split_mlp_runs_its_down_projection_apart_at_one_row(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    one, three = torch.tensor([[7]]), torch.tensor([[7], [8], [9]])
    with torch.inference_mode():
        references = [model(input_ids=ids).logits for ids in (one, three)]
    names = fusion.fuse(model, fusion.Fusion(split_mlp=True), backend="eager")
    try:
        assert "GlmMLP (split at one row)" in names
        mlp = model.model.layers[0].mlp
        mlp.forward.fused = front = Counted(mlp.forward.fused)
        with torch.inference_mode(), fusion.compiled():
            assert torch.allclose(model(input_ids=three).logits, references[1], atol=1e-5)
            assert front.calls == 0  # three rows: the MLP compiled whole
            assert torch.allclose(model(input_ids=one).logits, references[0], atol=1e-5)
            assert front.calls == 1
    finally:
        fusion.unfuse(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_fused_linears_are_those_outside_the_mlps(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    names = fusion.fuse(model, fusion.Fusion(linears="all"), backend="eager")
    try:
        assert "Linear" in names
        fused = {n for n, m in model.named_modules() if hasattr(vars(m).get("forward"), "fused")}
        layer = model.model.layers[0]
        assert "lm_head" in fused and "model.layers.0.self_attn.q_proj" in fused
        assert "model.layers.0.mlp.down_proj" not in fused  # compiled as part of its MLP
        assert hasattr(vars(layer.mlp).get("forward"), "fused")
        with torch.inference_mode(), fusion.compiled():
            assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-5)
    finally:
        fusion.unfuse(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_fused_qkv_is_one_product_over_views_of_one_weight(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    attn = model.model.layers[0].self_attn
    before = apply.weights_bytes([model])
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    names = fusion.fuse(model, fusion.Fusion(qkv=True, attention="matmul"), backend="eager")
    try:
        assert "FusedQKV" in names and "llm_server.attention.decode (matmul)" in names
        fused = attn.q_proj.forward.fused
        storage = fused.weight.untyped_storage().data_ptr()
        assert all(
            p.weight.untyped_storage().data_ptr() == storage for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        assert apply.weights_bytes([model]) == before  # views: nothing added
        fused.one_row = spy = Counted(fused.one_row)
        with torch.inference_mode():
            assert torch.equal(model(input_ids=ids).logits, reference)  # eager outside compiled()
            with fusion.compiled():
                assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-5)
                assert spy.calls == 0  # five rows: the eager product
                one = ids[:, :1]
                assert torch.allclose(model(input_ids=one).logits, reference[:, :1], atol=1e-5)
                assert spy.calls == 1  # one row: layer 0's compiled product, once for q, k and v
    finally:
        fusion.unfuse(model)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_fusion_for_plan_drops_qkv_when_the_budget_has_no_room_for_it(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    projections = fusion.projection_bytes(model)
    attn = model.model.layers[0].self_attn
    layer = sum(
        p.numel() * p.element_size() for m in (attn.q_proj, attn.k_proj, attn.v_proj) for p in m.parameters()
    )
    assert projections == len(model.model.layers) * layer
    assert fusion.for_plan(model, quantized=False, headroom_bytes=projections) == fusion.HALF
    assert fusion.for_plan(model, quantized=False, headroom_bytes=projections - 1).qkv is False
    assert fusion.for_plan(model, quantized=True, headroom_bytes=0) == fusion.QUANTIZED


def test_one_row_linears_compile_only_one_row_products(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    names = fusion.fuse(model, fusion.Fusion(linears="one-row"), backend="eager")
    try:
        assert "Linear (one row)" in names
        head = model.lm_head
        head.forward.fused = spy = Counted(head.forward.fused)
        with torch.inference_mode(), fusion.compiled():
            model(input_ids=torch.tensor([[1, 40, 41]]), logits_to_keep=2)
            assert spy.calls == 0
            model(input_ids=torch.tensor([[1, 40, 41]]), logits_to_keep=1)
            assert spy.calls == 1
    finally:
        fusion.unfuse(model)


def test_decode_attention_kernels_agree() -> None:
    from llm_server import attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, keys = 3, 8, 2, 16, 40
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(2, batch, kv_heads, keys, dim).unbind(0)
    mask = torch.zeros(batch, 1, 1, keys, dtype=torch.bool)
    mask[0, ..., 5:30] = True  # a row in the middle of the slots
    mask[1, ..., :] = True
    mask[2, ..., 39] = True  # a row's first token
    reference = attention.decode(query, key, value, mask, dim**-0.5, kernel="sdpa")
    out = attention.decode(query, key, value, mask, dim**-0.5, kernel="matmul")
    assert out.shape == (batch, kv_heads, heads // kv_heads, dim)
    assert torch.allclose(out, reference, atol=1e-5)
    free = attention.decode(query, key, value, torch.zeros_like(mask), dim**-0.5, kernel="matmul")
    assert torch.isfinite(free).all()  # a free slot's row: noise, never NaN


def queued_behind_the_first(
    eng: LlmEngine,
    requests: list[GenerationRequest],
    monkeypatch: pytest.MonkeyPatch,
    first_done: Callable[[], bool],
) -> list[str]:
    """Texts of the requests, the others submitted while the first one's prefill iteration is held.

    The scheduler's prefill waits 0.5 s while `first_done()` is false and something is prefilling,
    so the requests after the first queue up and are prefilled together.
    """
    prefill = eng._scheduler._prefill

    def slow_prefill() -> None:
        if eng._scheduler._prefilling and not first_done():
            time.sleep(0.5)
        prefill()

    monkeypatch.setattr(eng._scheduler, "_prefill", slow_prefill)
    results: list[str] = [""] * len(requests)
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, text_of(eng, requests[i])))
        for i in range(len(requests))
    ]
    threads[0].start()
    time.sleep(0.1)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_prompts_arriving_together_are_prefilled_in_one_batch(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = load(model_dir, max_batch_size=4)
    requests = [GenerationRequest(prompt=p, max_new_tokens=12) for p in PROMPTS[:4]]
    try:
        solo = [text_of(eng, r) for r in requests]
        scheduler = eng._scheduler
        groups: list[int] = []
        together = scheduler._prefill_together

        def spy(group: list[Any]) -> bool:
            groups.append(len(group))
            return together(group)

        monkeypatch.setattr(scheduler, "_prefill_together", spy)
        prompt_tokens = metric("scriptreel_llm_prompt_tokens_total")
        results = queued_behind_the_first(eng, requests, monkeypatch, lambda: bool(groups))
        assert 3 in groups  # the three that queued behind the first, in one forward pass
        assert results == solo  # right padding changes no row's numbers
        expected = sum(len(eng.validate(r).input_ids) for r in requests)
        assert metric("scriptreel_llm_prompt_tokens_total") - prompt_tokens == expected
    finally:
        eng.close()


def test_a_failed_batched_prefill_prefills_each_prompt_alone(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = load(model_dir, max_batch_size=4)
    requests = [GenerationRequest(prompt=p, max_new_tokens=10) for p in PROMPTS[:4]]
    try:
        solo = [text_of(eng, r) for r in requests]
        forward = eng.model.forward
        batched: list[int] = []

        def no_batches(*args: Any, **kwargs: Any) -> Any:  # out of memory for any batch of prompts
            rows, tokens = kwargs["input_ids"].shape
            if rows > 1 and tokens > 1:  # not a decoding step: those have one token per row
                batched.append(rows)
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(*args, **kwargs)

        monkeypatch.setattr(eng.model, "forward", no_batches)
        results = queued_behind_the_first(eng, requests, monkeypatch, lambda: bool(batched))
        assert batched == [3]  # tried once, then each alone
        assert results == solo
    finally:
        eng.close()


def test_a_slow_consumer_gets_the_waiting_text_in_one_delta(engine: LlmEngine) -> None:
    request = GenerationRequest(prompt=PROMPTS[1], max_new_tokens=40)
    expected = text_of(engine, request)
    stream = engine.generate(engine.validate(request), never)
    first = next(stream)
    assert isinstance(first, TextDelta)
    deadline = time.monotonic() + 10
    while metric("scriptreel_llm_batch_size") and time.monotonic() < deadline:
        time.sleep(0.01)  # the generation finishes while nobody reads
    rest = list(stream)
    assert [type(e) for e in rest] == [TextDelta, Finished]  # the backlog came as one delta
    assert first.text + rest[0].text == expected
    assert rest[1].completion_tokens == 40


# -- overlapped decoding steps (the host handles step n while step n+1 runs) --------------------------------
Outcome = tuple[str, str, int]  # text, finish reason, completion tokens


def outcome(
    engine: LlmEngine, request: GenerationRequest, should_stop: Callable[[], bool] = never
) -> Outcome:
    deltas, finished = run(engine, request, should_stop)
    return "".join(deltas), finished.finish_reason, finished.completion_tokens


def outcomes_concurrently(engine: LlmEngine, requests: list[GenerationRequest]) -> list[Outcome | Exception]:
    """Each request's outcome, all submitted at once."""
    results: list[Outcome | Exception] = [ValueError("not run")] * len(requests)

    def consume(i: int) -> None:
        try:
            results[i] = outcome(engine, requests[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def sync_engine(model_dir: Path) -> Iterator[LlmEngine]:
    eng = load(model_dir, overlap_steps=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def eos_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The tiny model with one more end-of-sequence token: PROMPTS[4]'s greedy token at index 8.

    Returns the folder and the completion tokens of PROMPTS[4] there (the end token counts).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(PROMPTS[4], return_tensors="pt")["input_ids"]
    greedy = (
        AutoModelForCausalLM.from_pretrained(model_dir)
        .generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, ids.shape[1] :]
        .tolist()
    )
    end = greedy[8]
    assert end not in greedy[:8]
    folder = tmp_path_factory.mktemp("llm-eos")
    for path in model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [*config["eos_token_id"], end]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder, 9


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_streams_that_end_beside_others_get_exactly_their_tokens(
    eos_dir: tuple[Path, int], engine: LlmEngine, overlap: bool
) -> None:
    folder, eos_tokens = eos_dir
    full = text_of(engine, GenerationRequest(prompt=PROMPTS[2], max_new_tokens=30))
    requests = [
        GenerationRequest(prompt=PROMPTS[4], max_new_tokens=40),  # ends at an end-of-sequence token
        GenerationRequest(prompt=PROMPTS[2], max_new_tokens=30, stop=[full[10:14]]),  # at a stop sequence
        GenerationRequest(prompt=PROMPTS[3], max_new_tokens=5),  # at max_new_tokens
        GenerationRequest(prompt=PROMPTS[0], max_new_tokens=48),  # goes on after them
        GenerationRequest(prompt=PROMPTS[5], max_new_tokens=1),  # ends at its prefill
    ]
    eng = load(folder, max_batch_size=6, overlap_steps=overlap)
    try:
        solo = [outcome(eng, r) for r in requests]
        assert [reason for _, reason, _ in solo] == ["stop", "stop_sequence", "length", "length", "length"]
        assert solo[0][2] == eos_tokens and solo[2][2] == 5 and solo[4][2] == 1
        assert solo[1][0] == full[: full.find(full[10:14])]
        generated = metric("scriptreel_llm_generated_tokens_total")
        first_tokens = metric("scriptreel_llm_time_to_first_token_seconds_count")
        per_token = metric("scriptreel_llm_time_per_output_token_seconds_count")
        assert outcomes_concurrently(eng, requests) == solo
        # Tokens computed for a stream after its end are never counted, nor streamed.
        assert metric("scriptreel_llm_generated_tokens_total") - generated == sum(n for _, _, n in solo)
        assert metric("scriptreel_llm_time_to_first_token_seconds_count") - first_tokens == len(requests)
        assert metric("scriptreel_llm_time_per_output_token_seconds_count") - per_token == len(requests) - 1
        deadline = time.monotonic() + 5  # the gauge is set after the iteration that sent the last event
        while metric("scriptreel_llm_batch_size") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert metric("scriptreel_llm_batch_size") == 0
    finally:
        eng.close()


def test_overlapped_and_synchronous_steps_give_the_same_tokens(
    engine: LlmEngine, sync_engine: LlmEngine
) -> None:
    requests = [
        GenerationRequest(prompt=p, max_new_tokens=n, temperature=t, top_k=k, top_p=q, seed=7 + i)
        for i, (p, n, t, k, q) in enumerate(
            [
                (PROMPTS[0], 40, 0.0, 0, 0.0),
                (PROMPTS[1], 12, 0.9, 50, 0.0),
                (PROMPTS[2], 33, 1.2, 0, 0.9),
                (PROMPTS[3], 7, 0.0, 0, 0.0),
                (PROMPTS[4], 25, 0.7, 20, 0.95),
                (PROMPTS[5], 18, 0.0, 0, 0.0),
            ]
        )
    ]
    solo = [outcome(sync_engine, r) for r in requests]
    assert [outcome(engine, r) for r in requests] == solo
    assert outcomes_concurrently(engine, requests) == solo
    assert outcomes_concurrently(sync_engine, requests) == solo


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_requests_join_and_leave_a_running_stream(model_dir: Path, overlap: bool) -> None:
    eng = load(model_dir, max_batch_size=4, overlap_steps=overlap)
    long = GenerationRequest(prompt=PROMPTS[1], max_new_tokens=150, temperature=0.8, seed=5)
    others = [
        GenerationRequest(
            prompt=LONG_PROMPT[:200], max_new_tokens=20
        ),  # longer: the running row shifts right
        GenerationRequest(prompt=PROMPTS[0], max_new_tokens=9, temperature=1.0, seed=3),
        GenerationRequest(prompt=PROMPTS[2], max_new_tokens=31),
    ]
    try:
        solo = outcome(eng, long)
        solo_others = [outcome(eng, r) for r in others]
        stream = eng.generate(eng.validate(long), never)
        first = next(stream)  # decoding, with the next steps already in flight
        assert isinstance(first, TextDelta)
        assert outcomes_concurrently(eng, others) == solo_others  # they joined and left while it ran
        rest = list(stream)
        assert isinstance(rest[-1], Finished) and rest[-1].completion_tokens == 150
        assert first.text + "".join(e.text for e in rest if isinstance(e, TextDelta)) == solo[0]
    finally:
        eng.close()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_cancelling_mid_batch_leaves_the_others_exact(model_dir: Path, overlap: bool) -> None:
    eng = load(model_dir, max_batch_size=4, overlap_steps=overlap)
    requests = [GenerationRequest(prompt=p, max_new_tokens=40) for p in PROMPTS[:4]]
    try:
        solo = [outcome(eng, r) for r in requests]
        calls = 0

        def stop_after_a_few() -> bool:
            nonlocal calls
            calls += 1
            return calls > 8

        generated = metric("scriptreel_llm_generated_tokens_total")
        results: list[Outcome | Exception] = [ValueError("not run")] * 4

        def consume(i: int) -> None:
            try:
                results[i] = outcome(eng, requests[i], stop_after_a_few if i == 1 else never)
            except Exception as exc:
                results[i] = exc

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(results[1], Cancelled)
        assert [results[i] for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]
        cancelled_tokens = metric("scriptreel_llm_generated_tokens_total") - generated - 120
        assert 1 <= cancelled_tokens < 40
    finally:
        eng.close()


def test_non_finite_logits_of_one_row_fail_only_its_request(engine: LlmEngine) -> None:
    long = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=60)
    solo = outcome(engine, long)

    def poison_the_second_row(_module: Any, _args: Any, logits: torch.Tensor) -> None:
        if logits.shape[0] > 1:  # decoding steps of two or more rows only
            logits[1] = float("nan")

    stream = engine.generate(engine.validate(long), never)
    first = next(stream)
    assert isinstance(first, TextDelta)
    hook = engine.model.lm_head.register_forward_hook(poison_the_second_row)
    try:
        sampled = GenerationRequest(prompt=PROMPTS[2], max_new_tokens=20, temperature=1.0, seed=9)
        with pytest.raises(NonFiniteOutput, match="at token 2"):
            run(engine, sampled)  # its first token came from its prefill; its first decoding step is NaN
    finally:
        hook.remove()
    rest = list(stream)
    assert first.text + "".join(e.text for e in rest if isinstance(e, TextDelta)) == solo[0]


def test_a_row_at_the_end_of_its_slot_never_writes_past_it(model_dir: Path) -> None:
    eng = load(model_dir, max_batch_size=3, max_context_tokens=40)
    try:
        requests = [
            GenerationRequest(
                prompt=p, max_new_tokens=40 - eng.validate(GenerationRequest(prompt=p)).prompt_tokens
            )
            for p in PROMPTS[1:4]
        ]
        solo = [outcome(eng, r) for r in requests]
        assert all(reason == "length" for _, reason, _ in solo)
        assert outcomes_concurrently(eng, requests) == solo  # the longest rows fill their slots exactly
    finally:
        eng.close()


def test_device_sampling_survives_non_finite_rows() -> None:
    logits = torch.randn(4, 50)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0.5, top_k=5, seed=12),
        SamplingParams(temperature=0.8, top_p=0.9, seed=13),
    ]
    tokens, finite = sample_batch(logits, [(p, make_generator(p, logits.device)) for p in params])
    assert finite.tolist() == [True, False, False, True]
    assert tokens[0] == logits[0].argmax()
    assert tokens[3] == next_token(logits[3], params[3], make_generator(params[3], logits.device))
    assert bool(((tokens >= 0) & (tokens < 50)).all())  # every row's token can be fed to the next step


def test_gemv_runs_every_one_row_product_of_a_step(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusion.gemv: at one row, q/k/v, output, gate-and-up, down and LM head go through llm_server.gemv."""
    from llm_server import gemv

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    one, three = torch.tensor([[7]]), torch.tensor([[7], [8], [9]])
    with torch.inference_mode():
        references = [model(input_ids=ids).logits for ids in (one, three)]
    shapes: list[tuple[int, ...]] = []
    product = gemv.one_row_linear

    @torch._dynamo.disable
    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shapes.append(tuple(weight.shape))
        return product(x, weight, bias)

    monkeypatch.setattr(gemv, "one_row_linear", spy)
    names = fusion.fuse(model, dataclasses.replace(fusion.HALF, tune=False), backend="eager")
    try:
        assert "one-row products (llm_server.gemv)" in names
        with torch.inference_mode(), fusion.compiled():
            assert torch.allclose(model(input_ids=three).logits, references[1], atol=1e-5)
            assert shapes == []  # three rows: cuBLAS (or the CPU's) products
            assert torch.allclose(model(input_ids=one).logits, references[0], atol=1e-5)
    finally:
        fusion.unfuse(model)
    config, layers = model.config, len(model.model.layers)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    hidden, ffn = config.hidden_size, config.intermediate_size
    layer = [
        (qkv, hidden),
        (hidden, config.num_attention_heads * config.head_dim),
        (2 * ffn, hidden),
        (hidden, ffn),
    ]
    assert shapes == layer * layers + [(config.vocab_size, hidden)]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gemv_runs_torchao_weights_as_stored_with_their_scales(
    precision: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quantized plans' one-row products: torchao's INT8/FP8 tensors unpacked, scaled per row."""
    from llm_server import gemv
    from vram.plan import PrecisionPlan

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    plan = PrecisionPlan(precision=precision, compute_dtype="float32", keep_fp32=("lm_head",))
    apply.quantize_linears(model, plan)
    down = model.model.layers[0].mlp.down_proj
    stored, scale = gemv.unpack(down.weight)  # type: ignore[misc]
    assert stored.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[precision]
    assert scale.shape == (down.out_features, 1) and gemv.unpack(model.lm_head.weight) is None

    x = torch.randn(1, 1, down.in_features)
    expected = down(x)  # torchao's own product
    assert torch.allclose(gemv.product(x, down.weight, down.bias), expected, atol=1e-4, rtol=1e-3)

    one, three = torch.tensor([[7]]), torch.tensor([[7], [8], [9]])
    with torch.inference_mode():
        references = [model(input_ids=ids).logits for ids in (one, three)]

    def spy_on(name: str) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        original = getattr(gemv, name)

        @torch._dynamo.disable
        def spy(x: torch.Tensor, weight: torch.Tensor, *rest: Any) -> torch.Tensor:
            shapes.append(tuple(weight.shape))
            return original(x, weight, *rest)

        monkeypatch.setattr(gemv, name, spy)
        return shapes

    scaled, plain = spy_on("one_row_scaled_linear"), spy_on("one_row_linear")
    options = dataclasses.replace(fusion.QUANTIZED, tune=False)
    names = fusion.fuse(model, options, backend="eager")
    try:
        assert "one-row products (llm_server.gemv)" in names
        with torch.inference_mode(), fusion.compiled():
            assert torch.allclose(model(input_ids=three).logits, references[1], atol=1e-4)
            assert scaled == plain == []  # three rows: the compiled Linears
            assert torch.allclose(model(input_ids=one).logits, references[0], atol=1e-4)
    finally:
        fusion.unfuse(model)
    config, layers = model.config, len(model.model.layers)
    hidden, ffn, head = config.hidden_size, config.intermediate_size, config.head_dim
    kv = config.num_key_value_heads * head
    layer = [
        (config.num_attention_heads * head, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, config.num_attention_heads * head),
        (2 * ffn, hidden),
        (hidden, ffn),
    ]
    assert sorted(scaled) == sorted(layer * layers)  # every quantized product, by the scaled kernel
    assert plain == [(config.vocab_size, hidden)]  # the LM head, kept unquantized


def test_gemv_off_the_gpu_is_f_linear() -> None:
    from llm_server import gemv

    x, weight, bias = torch.randn(1, 1, 48), torch.randn(20, 48), torch.randn(20)
    assert not gemv.fits(x, weight, bias)  # CPU
    assert torch.equal(gemv.one_row_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    assert gemv.launch_config(27392, 4096) == gemv.MEASURED[(27392, 4096, "float16")]
    assert gemv.launch_config(27392, 4096, torch.int8) == gemv.MEASURED[(27392, 4096, "int8")]
    assert gemv.launch_config(11008, 4096) == (1, 2048, 8)  # another model's MLP: the rule
    assert gemv.launch_config(4096, 11008) == (4, 2048, 4)
    assert gemv.launch_config(32, 64) == (1, 64, 1)  # a tiny model's: one warp for 64 columns
    assert gemv.launch_config(11008, 4096, torch.int8) == (2, 4096, 4)  # 1-byte rows: 2 a program
    assert gemv.launch_config(4096, 11008, torch.float8_e4m3fn) == (4, 2048, 4)  # 64 accumulators a thread
    assert gemv.launch_config(512, 4096, torch.int8) == (1, 4096, 8)  # too few rows to pair them
