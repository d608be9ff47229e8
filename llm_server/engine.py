"""The LLM engine: loads one causal LM under a precision plan and streams generations. No gRPC here.

`LlmEngine.load` predicts the model's footprint from its config, resolves the precision plan, loads
the weights (falling back FP16 -> BF16 -> FP32 when a warm-up pass gives non-finite logits), applies
the plan, and starts the batch scheduler. `validate` turns a request into a PreparedRequest or raises
InvalidArgument listing every violation; `generate` streams TextDelta pieces and a Finished.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llm_server import footprint as fp
from llm_server import fusion
from llm_server import metrics as llm_metrics
from llm_server.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    Finished,
    GenerationRequest,
    PreparedRequest,
    TextDelta,
    field_violations,
    plain_chat,
)
from llm_server.sampling import SamplingParams, resolve_seed
from llm_server.scheduler import BatchScheduler, Done, RequestState
from llm_server.stops import locked_decoder
from serving.errors import Cancelled, FieldViolation, NotReady, collect
from vram import apply, hardware, loader, metrics
from vram.backends import torchao_precisions
from vram.monitor import VramMonitor
from vram.plan import QUANTIZED, Footprint, Hardware, Policy, PrecisionPlan, fallback_chain, resolve_plan

log = logging.getLogger(__name__)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
# How often a caller waiting for its next token checks should_stop (the scheduler checks every step).
POLL_S = 0.05
# Linear layers never quantized: the logits feed sampling directly, and with tied embeddings the
# lm_head weight is the embedding table, which a quantized tensor subclass cannot serve as.
QUANTIZE_SKIP = ("lm_head",)


@dataclass(frozen=True)
class LlmEngineConfig:
    """Settings of one LLM engine.

    Attributes:
        model_dir: A transformers model folder (config, safetensors weights, tokenizer).
        device: "cpu", "cuda", "cuda:N" or "auto".
        policy: The precision policy (precision, keep_fp32, budget, fallback).
        trust_remote_code: Allow model code from the folder (off unless explicitly enabled).
        max_new_tokens_limit: Upper bound of a request's max_new_tokens.
        max_batch_size: Sequences decoded together at most (continuous batching).
        max_queue: Requests that may wait for a batch slot; beyond it, RESOURCE_EXHAUSTED.
        max_context_tokens: Cap on prompt + generated tokens below the model's own context (None: the
            model's). The KV cache allocated at start is max_batch_size slots of this many tokens.
        prefill_chunk: Prompt tokens prefilled per scheduler iteration while a batch decodes.
        cuda_graphs: Replay decoding steps from CUDA graphs (GPU only; off: eager, slower).
        fuse_kernels: With CUDA graphs, torch.compile pieces of the decoding step into them
            (llm_server.fusion.for_plan chooses which per plan; on an H200 with a 6B model, FP16
            batch-1 decode went from 154 to 244 tokens/s in-process and INT8 from 136 to 262, and
            with llm_server.gemv's one-row products to 271 (FP16) and 327 (INT8); about 30-60 s at
            start).
        overlap_steps: Launch each decoding step before the host handles the previous step's tokens,
            so the device does not wait for the host between steps (off: one step at a time).
        release_cache_above: After a request, release the allocator's cache above this many bytes.
        min_free: Warn when free device memory under the budget falls below this many bytes.

    """

    model_dir: Path
    device: str = "auto"
    policy: Policy = field(default_factory=Policy)
    trust_remote_code: bool = False
    max_new_tokens_limit: int = 1024
    max_batch_size: int = 8
    max_queue: int = 64
    max_context_tokens: int | None = None
    prefill_chunk: int = 512
    cuda_graphs: bool = True
    fuse_kernels: bool = True
    overlap_steps: bool = True
    release_cache_above: int = 1 << 30
    min_free: int = 512 << 20


class LlmEngine:
    """One loaded causal LM, its tokenizer, its precision plan, and the scheduler that batches it.

    Build with `LlmEngine.load`. Attributes: plan (the resolved PrecisionPlan), monitor (VramMonitor),
    parameter_count, architecture (e.g. "GlmForCausalLM"), model_name (the folder's name),
    max_context_tokens, device ("cpu", "cuda:0"), hardware, footprint (the prediction the plan was
    resolved against), model, tokenizer.
    """

    def __init__(
        self,
        config: LlmEngineConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        plan: PrecisionPlan,
        hw: Hardware,
        model_config: PretrainedConfig,
        footprint: Footprint,
        max_context_tokens: int,
        monitor: VramMonitor | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.hardware = hw
        self.device = hw.device
        self.model_config = model_config
        self.footprint = footprint
        self.max_context_tokens = max_context_tokens
        self.model_name = Path(config.model_dir).name
        self.architecture = (model_config.architectures or [type(model).__name__])[0]
        self.parameter_count = apply.parameter_count([model])
        self.monitor = monitor or VramMonitor(
            self.device, config.policy.budget_bytes, config.release_cache_above, config.min_free
        )
        self.monitor.weights_bytes = apply.weights_bytes([model])
        self._width = apply.compute_dtype(plan).itemsize
        self._tokenizer_lock = threading.Lock()
        self._decode = locked_decoder(tokenizer, self._tokenizer_lock)
        self._scheduler = BatchScheduler(
            model,
            _eos_ids(model, tokenizer),
            config.max_batch_size,
            config.max_queue,
            context_tokens=max_context_tokens,
            prefill_chunk=config.prefill_chunk,
            cuda_graphs=config.cuda_graphs,
            fuse_kernels=config.fuse_kernels,
            overlap_steps=config.overlap_steps,
            fusion_options=fusion.for_plan(
                model,
                plan.precision in QUANTIZED,
                (plan.budget_bytes or hw.total_bytes) - plan.predicted_peak_bytes,
            ),
        )
        log.info(
            "decode: %d slots of %d tokens (%.0f MiB of KV cache), CUDA graphs %s, compiled %s, "
            "attention %s, overlapped steps %s",
            config.max_batch_size,
            max_context_tokens,
            self._scheduler.kv_cache_bytes / 2**20,
            "on" if self._scheduler.cuda_graphs else "off",
            ", ".join(self._scheduler.fused) or "nothing",
            "slots" if self._scheduler.slot_attention else model.config._attn_implementation,
            "on" if config.overlap_steps else "off",
        )

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: LlmEngineConfig) -> LlmEngine:
        """Predict, plan, load, warm up, and start serving.

        Raises:
            vram.plan.PlanError: The policy cannot be honoured on this device or budget.
            RuntimeError: Every allowed precision failed to load or gave non-finite warm-up logits.

        """
        model_dir = Path(config.model_dir)
        hw = hardware.detect(config.device)
        trust = config.trust_remote_code
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
        model_context = getattr(model_config.get_text_config(), "max_position_embeddings", None) or 2048
        context = min(model_context, config.max_context_tokens or model_context)
        footprint = fp.predict_footprint(
            model_config,
            config.max_batch_size,
            context,
            trust,
            quantize_skip=QUANTIZE_SKIP,
            prefill_chunk=config.prefill_chunk,
            cuda_graphs=config.cuda_graphs and hw.is_cuda,
        )
        policy = dataclasses.replace(
            config.policy, quantized_backends=config.policy.quantized_backends & torchao_precisions()
        )
        plan = resolve_plan(footprint, hw, policy)
        log.info("precision plan for %s on %s: %s", model_dir, hw.device, plan.reason)
        # The budget caps the allocator from here on: loading and warm-up must fit it too.
        monitor = VramMonitor(hw.device, policy.budget_bytes, config.release_cache_above, config.min_free)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)

        def on_fallback(failed: PrecisionPlan, why: str) -> None:
            to = fallback_chain(failed, policy, hw)[0]
            metrics.FALLBACKS_TOTAL.labels(failed.precision, to).inc()

        model, plan = loader.load_with_fallback(
            lambda p: _load_model(model_dir, p, hw.device, trust),
            lambda m: _probe(m, tokenizer),
            plan,
            policy,
            hw,
            footprint,
            on_fallback=on_fallback,
            release=lambda m: _release(hw),
        )
        engine = cls(config, model, tokenizer, plan, hw, model_config, footprint, context, monitor)
        engine._export_metrics()
        return engine

    def _export_metrics(self) -> None:
        metrics.MODEL_WEIGHTS_BYTES.labels(self.model_name, self.plan.precision).set(
            self.monitor.weights_bytes
        )
        metrics.MODEL_PARAMETERS.labels(self.model_name).set(self.parameter_count)
        metrics.MODEL_INFO.labels(model=self.model_name, device=self.device, **self.plan.labels()).set(1)
        metrics.PREDICTED_PEAK_BYTES.labels(self.device).set(self.plan.predicted_peak_bytes)
        llm_metrics.DECODE_STEP_SECONDS.set((self._scheduler.replay_ms or 0.0) / 1000)
        if self.monitor.is_cuda:
            metrics.LOAD_PEAK_BYTES.labels(self.device).set(torch.cuda.max_memory_allocated(self.device))

    def close(self) -> None:
        """Stop the scheduler; requests still running fail with NotReady."""
        self._scheduler.close()

    # -- requests -------------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> PreparedRequest:
        """Check and tokenize a request, resolving its defaults.

        Raises:
            InvalidArgument: With one violation per bad field (names as in GenerateRequest).

        """
        bad = field_violations(request, self.config.max_new_tokens_limit)
        if any(v.field in ("prompt", "messages") or v.field.startswith("messages[") for v in bad):
            collect(bad)
        ids = self._encode(request, bad)
        max_new = request.max_new_tokens
        if ids is not None and not any(v.field == "max_new_tokens" for v in bad):
            max_new = self._check_context(request, len(ids), bad)
        collect(bad)
        assert ids is not None
        sampling = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            top_k=request.top_k,
            seed=resolve_seed(request.seed),
        )
        return PreparedRequest(
            input_ids=tuple(ids),
            max_new_tokens=max_new,
            sampling=sampling,
            stop=tuple(request.stop),
            json_schema=request.json_schema,
            predicted_bytes=fp.request_bytes(
                self.model_config, len(ids), self.config.prefill_chunk, self._width
            ),
        )

    def _encode(self, request: GenerationRequest, bad: list[FieldViolation]) -> list[int] | None:
        tok = self.tokenizer
        with self._tokenizer_lock:
            if not request.messages:
                return list(tok(request.prompt)["input_ids"])
            if not tok.chat_template:
                return list(tok(plain_chat(request.messages))["input_ids"])
            chat = [{"role": role, "content": content} for role, content in request.messages]
            try:
                text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            except (jinja2.TemplateError, ValueError) as exc:
                bad.append(FieldViolation("messages", f"the model's chat template rejected them: {exc}"))
                return None
            return list(tok(text, add_special_tokens=False)["input_ids"])

    def _check_context(
        self, request: GenerationRequest, prompt_tokens: int, bad: list[FieldViolation]
    ) -> int:
        """Resolve max_new_tokens' default; add a violation when prompt and completion cannot fit."""
        context = self.max_context_tokens
        where = "messages" if request.messages else "prompt"
        explicit = request.max_new_tokens
        room = context - prompt_tokens
        max_new = explicit or min(DEFAULT_MAX_NEW_TOKENS, self.config.max_new_tokens_limit, room)
        if prompt_tokens == 0:
            bad.append(FieldViolation(where, "encodes to no tokens"))
        elif max_new < 1 or prompt_tokens + max_new > context:
            also = f" and max_new_tokens is {explicit}" if explicit else ""
            bad.append(
                FieldViolation(
                    where, f"prompt is {prompt_tokens} tokens; the model's context is {context}{also}"
                )
            )
        return max_new

    def generate(
        self, prepared: PreparedRequest, should_stop: Callable[[], bool]
    ) -> Generator[TextDelta | Finished, None, None]:
        """Stream one generation; the request joins the running batch at the next decoding step.

        Args:
            prepared: From `validate`.
            should_stop: Returns True when the client went away (checked at every decoding step).

        Yields:
            TextDelta pieces, then one Finished.

        Raises:
            Cancelled: should_stop returned True, or the generator was closed.
            ResourceExhausted: The queue is full, or the request does not fit in device memory.
            NonFiniteOutput: The model produced NaN/Inf logits.
            NotReady: The engine was closed.

        """
        state = RequestState(prepared, should_stop, self._decode, torch.device(self.device))
        with self.monitor.request(prepared.predicted_bytes) as memory:
            self._scheduler.submit(state)
            try:
                while True:
                    try:
                        event = state.events.get(timeout=POLL_S)
                    except queue.Empty:
                        if should_stop():
                            raise Cancelled("the request was cancelled") from None
                        if not self._scheduler.running:
                            raise NotReady("the LLM engine stopped") from None
                        continue
                    if isinstance(event, BaseException):
                        raise event
                    if isinstance(event, Done):
                        yield Finished(
                            event.finish_reason, prepared.prompt_tokens, event.completion_tokens, memory()
                        )
                        return
                    # A consumer that fell behind (a busy event loop) gets the text waiting for it
                    # as one delta: fewer, larger messages instead of a growing backlog.
                    text, after = _drain_text(state.events, event.text)
                    yield TextDelta(text)
                    if after is not None:
                        state.events.put(after)  # the only producer is done with this request
            finally:
                state.cancelled.set()  # a consumer that stops early frees the batch slot


def _drain_text(
    events: queue.SimpleQueue[TextDelta | Done | BaseException], text: str
) -> tuple[str, TextDelta | Done | BaseException | None]:
    """Append every TextDelta already queued to `text`; return it and the first other event, if any."""
    pieces = [text]
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return "".join(pieces), None
        if not isinstance(event, TextDelta):
            return "".join(pieces), event
        pieces.append(event.text)


def _load_model(
    model_dir: Path, plan: PrecisionPlan, device: str, trust_remote_code: bool
) -> PreTrainedModel:
    """Load the weights under `plan`: compute dtype, FP32 islands, quantized linears.

    Quantized plans load on the CPU and move to the device one quantized layer at a time, so the
    device never holds the half-precision weights (the load would otherwise peak at twice the plan).
    """
    quantized = plan.precision in ("int8", "fp8", "int4")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=apply.load_dtype(plan),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        device_map="cpu" if quantized else device,
    )
    model.eval()
    apply.keep_fp32(model, plan.keep_fp32)
    if quantized:
        count = apply.quantize_linears(model, plan, skip=QUANTIZE_SKIP, device=device)
        log.info("%d linear layers stored in %s", count, plan.precision)
    return model


def _probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Warm-up forward pass; raises WarmupFailed when any logit is NaN or Inf."""
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    if not apply.all_finite(logits):
        raise loader.WarmupFailed(f"non-finite logits in the warm-up pass ({logits.dtype})")


def _release(hw: Hardware) -> None:
    gc.collect()
    if hw.is_cuda:
        torch.cuda.empty_cache()


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token id that ends a sequence: the generation config's and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)
