"""Continuous batching: one thread owns the model; requests join the decode batch between steps.

Each iteration the scheduler
1. takes waiting requests while slots are free;
2. prefills prompts, at most one chunk's worth of tokens (`prefill_chunk`) per iteration while a
   batch is decoding, so a long prompt delays the running streams by one chunk per token, never by
   its whole prefill: short prompts waiting together in one right-padded batch (a burst of requests
   costs one forward pass, not one each), longer ones alone and in chunks; a finished prefill samples
   its first token (streamed at once) and its keys, values and that token move into a free row of
   the SlotCache;
3. drops sequences whose client went away or whose deadline passed;
4. launches one decoding step of the whole batch (llm_server.decode: a CUDA graph replay on a GPU)
   and samples it on the device: the sampled tokens are the next step's inputs there, and start
   their way to the host (a Readback);
5. handles the step launched one iteration earlier (with `overlap_steps`; else this iteration's):
   waits for its tokens and hands each to its request (text, stop checks, events, metrics);
6. drops the sequences that ended, at once, so their slots serve the next request.

With `overlap_steps` the host's work for step n (5, then 6, 1-3 and the launch of n+2) runs while the
device computes step n+1, so the device does not wait for the host between steps. A sequence that
ended at step n was computed once more in step n+1: that token is discarded when step n+1 is handled
(its request has ended), and its row leaves the slots behind step n+1 in the device's order. The
extra step stays inside the slot: it writes the keys and values of the sequence's last token, column
prompt + max_new_tokens - 1 at most, and validation keeps prompt + max_new_tokens within the context,
the slots' length (a second extra step could pass it: one launched step at most waits unhandled).
Joins and leaves need no draining: the slots append a row with its first token, or pack the rows
with their next tokens, in the device's order after the steps already launched, and each launched
step remembers the requests of its rows. Without `overlap_steps` each step is handled right after
its launch: the same loop, zero steps deep.

Events for a request (TextDelta, then Done or an exception) go to its own queue, which the caller's
thread reads; nothing here blocks on a client.
"""

from __future__ import annotations

import collections
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from llm_server import fusion, metrics
from llm_server.attention import use_slot_attention
from llm_server.decode import DecodeStep, Readback
from llm_server.generation import PreparedRequest, TextDelta
from llm_server.sampling import make_generator, sample_batch
from llm_server.slots import SlotCache
from llm_server.stops import TextStream
from serving.errors import Cancelled, NonFiniteOutput, NotReady, ResourceExhausted
from vram import metrics as vram_metrics

log = logging.getLogger(__name__)

# cuDNN's attention (PyTorch's first choice for FP16/BF16 on Hopper) builds a plan for every new key
# length, about 55 ms each on an H200: a decode loop, whose key length grows by one every step, paid
# that at every step (12 s instead of 0.9 s for the first 200 tokens of the tiny model). The other
# kernels have no per-shape setup.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A batch of prompts keeps the logits of each distinct prompt length for every row (transformers keeps
# the same positions in every row): rows x lengths vocabularies. This caps that product (64 rows of a
# 152k vocabulary in FP32 are 39 MB), so a burst of prompts of many lengths takes a few passes.
PREFILL_LOGIT_ROWS = 64


Layers = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) of each layer


@dataclass(frozen=True)
class Done:
    """The scheduler's last event for a request that ended normally."""

    finish_reason: str
    completion_tokens: int


class UnsupportedModel(RuntimeError):
    """The model's KV cache is not one the batch scheduler can hold in slots."""


class RequestState:
    """One request in flight: its settings, its text stream, and the queue its events go to."""

    def __init__(
        self,
        prepared: PreparedRequest,
        should_stop: Callable[[], bool],
        decode: Callable[[Sequence[int]], str],
        device: torch.device,
    ) -> None:
        self.prepared = prepared
        self.should_stop = should_stop
        self.events: queue.SimpleQueue[TextDelta | Done | BaseException] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.stream = TextStream(decode, prepared.stop)
        self.generator = make_generator(prepared.sampling, device)
        self.generated = 0
        self.ended = False  # its last event is out; tokens still computed for it are discarded
        self.submitted_at = time.perf_counter()
        self.first_token_at = self.last_token_at = 0.0

    def end(self, event: Done | BaseException) -> None:
        """Send the request's last event."""
        self.events.put(event)
        self.ended = True

    def wants_stop(self) -> bool:
        """Whether the caller cancelled or its client went away."""
        if self.cancelled.is_set():
            return True
        try:
            return bool(self.should_stop())
        except Exception:  # a broken should_stop must not take the batch down
            log.exception("should_stop raised; cancelling the request")
            return True


class Prefill:
    """A request whose prompt is being prefilled, chunk by chunk, into its own cache."""

    def __init__(self, seq: RequestState, cache: DynamicCache) -> None:
        self.seq, self.cache, self.done = seq, cache, 0
        self.alone = False  # prefilled by itself (its batch's forward pass failed)


@dataclass
class LaunchedStep:
    """A decoding step queued on the device: the requests of its rows, and its tokens on their way."""

    seqs: list[RequestState]
    readback: Readback = field(repr=False)


class BatchScheduler:
    """Owns the model on one thread and decodes every admitted request in one batch.

    Args:
        model: The loaded causal LM (transformers Cache API).
        eos_ids: Token ids that end a sequence.
        max_batch_size: Sequences decoded together at most (the slots).
        max_queue: Requests that may wait for a slot; one more is refused (RESOURCE_EXHAUSTED).
        context_tokens: Prompt + generated tokens of one sequence at most (each slot's length).
        prefill_chunk: Prompt tokens prefilled per iteration while a batch is decoding.
        cuda_graphs: Replay decoding steps from CUDA graphs (on a GPU).
        fuse_kernels: With CUDA graphs, capture compiled norms, MLPs and rotary embedding in them
            (llm_server.fusion); if that fails, the graphs are captured without.
        fusion_options: With fuse_kernels, what else is compiled (llm_server.fusion.Fusion).
        overlap_steps: Launch each decoding step before handling the previous one's tokens (see the
            module docstring); off, each step is handled right after its launch.

    Raises:
        UnsupportedModel: The model's cache has layers other than transformers' plain DynamicLayer
            (sliding windows, for example).

    """

    def __init__(
        self,
        model: PreTrainedModel,
        eos_ids: frozenset[int],
        max_batch_size: int,
        max_queue: int,
        context_tokens: int,
        prefill_chunk: int = 512,
        cuda_graphs: bool = True,
        fuse_kernels: bool = True,
        overlap_steps: bool = True,
        fusion_options: fusion.Fusion = fusion.NOTHING_MORE,
    ) -> None:
        self._model = model
        # transformers renamed past_key_values to cache (5.2x); accept both so either release runs.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._device = next(model.parameters()).device
        self._eos = eos_ids
        self._max_queue = max_queue
        self._chunk = prefill_chunk
        self.slot_attention = use_slot_attention(model)
        graphs = cuda_graphs and self._device.type == "cuda"
        fused = graphs and fuse_kernels
        self.fused = fusion.fuse(model, fusion_options) if fused else []
        with torch.inference_mode():
            self._slots = SlotCache(max_batch_size, context_tokens, self._layer_shapes(), self._device)
            self._decode = DecodeStep(model, self._slots, self._cache_kw, graphs)
            if self.fused and not self._decode.graphs:  # compiling or capturing the fused kernels failed
                fusion.unfuse(model)
                self.fused = []
                self._decode = DecodeStep(model, self._slots, self._cache_kw, graphs)
        self._kv_bytes = self._slots.nbytes()
        metrics.KV_CACHE_BYTES.set(self._kv_bytes)
        self._cv = threading.Condition()
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._closed = False
        self._prefilling: collections.deque[Prefill] = collections.deque()
        self._batch: list[RequestState] = []  # row i of the slots is self._batch[i]
        self._launched: collections.deque[LaunchedStep] = collections.deque()
        self._depth = 1 if overlap_steps else 0  # launched steps left unhandled; more could pass a slot's end
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
        self._thread.start()

    @property
    def cuda_graphs(self) -> bool:
        """Whether decoding steps replay CUDA graphs."""
        return self._decode.graphs

    @property
    def replay_ms(self) -> float | None:
        """A one-row step's replay measured at start (None without CUDA graphs)."""
        return self._decode.replay_ms

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the slots' keys and values (allocated at start)."""
        return self._kv_bytes

    def submit(self, seq: RequestState) -> None:
        """Queue a request for the next step.

        Raises:
            ResourceExhausted: max_queue requests are already waiting.
            NotReady: The scheduler is closed.

        """
        with self._cv:
            if self._closed:
                raise NotReady("the LLM engine is shut down")
            if len(self._waiting) >= self._max_queue:
                raise ResourceExhausted(
                    f"queue full: {len(self._waiting)} requests waiting for the model", retry_after_s=1.0
                )
            self._waiting.append(seq)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._cv.notify()

    @property
    def running(self) -> bool:
        """Whether the scheduler thread is alive."""
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread; requests still waiting or running fail with NotReady."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- start-up ------------------------------------------------------------------------------------
    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self._model.config)

    def _layer_shapes(self) -> list[tuple[int, int, torch.dtype]]:
        """(key/value heads, head dim, dtype) per layer, from a one-token prefill."""
        cache = self._new_cache()
        ids = torch.zeros((1, 1), dtype=torch.long, device=self._device)
        self._model(input_ids=ids, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1)
        kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
        if kinds:
            raise UnsupportedModel(
                f"the model's KV cache has {', '.join(sorted(kinds))} layers; the batch scheduler "
                "holds plain (full attention) layers only"
            )
        return [(k.shape[1], k.shape[3], k.dtype) for k, _ in _kv_layers(cache)]

    # -- the loop (scheduler thread only) ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                self._waiting = collections.deque(s for s in self._waiting if not s.cancelled.is_set())
                while not (self._waiting or self._batch or self._prefilling or self._closed):
                    self._cv.wait()
                if self._closed:
                    break
                room = self._slots.rows - len(self._batch) - len(self._prefilling)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                metrics.QUEUE_DEPTH.set(len(self._waiting))
            try:
                with torch.inference_mode(), sdpa_kernel(DECODE_ATTENTION):
                    self._prefilling.extend(Prefill(seq, self._new_cache()) for seq in joining)
                    self._prefill()
                    for seq in self._batch:
                        self._cancel_if_stopped(seq)
                    self._drop_ended()
                    self._decode_step()
                metrics.BATCH_SIZE.set(len(self._batch))
                metrics.KV_CACHE_BYTES.set(self._kv_bytes + sum(_nbytes(j.cache) for j in self._prefilling))
            except Exception as exc:  # the batch's state is unknown: fail its requests, keep serving
                log.exception("decoding step failed for a batch of %d", len(self._batch))
                self._end_all(exc, joining)
        with self._cv:
            for seq in self._waiting:
                seq.end(NotReady("the LLM engine shut down before the request finished"))
            self._waiting.clear()
        self._end_all(NotReady("the LLM engine shut down before the request finished"))

    def _end_all(self, error: BaseException, joining: Sequence[RequestState] = ()) -> None:
        """Fail every request in the batch, in prefill or joining it (taken from the queue); forget them."""
        for seq in [*self._batch, *(job.seq for job in self._prefilling), *joining]:
            if not seq.ended:
                seq.end(error)
        self._batch, self._prefilling = [], collections.deque()
        self._launched.clear()
        self._slots.clear()

    def _prefill(self) -> None:
        """Prefill waiting prompts: everything when nothing decodes, else one chunk's worth of tokens.

        Short prompts waiting together (a burst of requests) are prefilled in one forward pass, as
        long as their padded batch holds at most one chunk of tokens; the others alone, chunk by chunk.
        """
        budget = self._chunk if self._batch else None
        while self._prefilling and (budget is None or budget > 0):
            group = self._whole_prompts(budget)
            if len(group) > 1:
                if self._prefill_together(group) and budget is not None:  # else requeued, budget intact
                    budget -= sum(len(job.seq.prepared.input_ids) for job in group)
                continue
            job = self._prefilling[0]
            if self._cancel_if_stopped(job.seq):
                self._prefilling.popleft()
                continue
            prompt = job.seq.prepared.input_ids
            take = min(len(prompt) - job.done, self._chunk, budget or self._chunk)
            try:
                ids = torch.tensor(
                    [prompt[job.done : job.done + take]], dtype=torch.long, device=self._device
                )
                logits = self._model(
                    input_ids=ids, **{self._cache_kw: job.cache}, use_cache=True, logits_to_keep=1
                ).logits
                metrics.PROMPT_TOKENS_TOTAL.inc(take)
                job.done += take
                if budget is not None:
                    budget -= take
                if job.done == len(prompt):
                    self._prefilling.popleft()
                    self._join([(job.seq, _kv_layers(job.cache))], logits[:, -1])
            except Exception as exc:  # this request fails; the batch goes on
                log.exception("prefill failed")
                if self._prefilling and self._prefilling[0] is job:
                    self._prefilling.popleft()
                job.seq.end(exc)

    def _whole_prompts(self, budget: int | None) -> list[Prefill]:
        """The leading not-yet-started prompts whose padded batch fits one chunk (and the budget)."""
        group: list[Prefill] = []
        lengths: set[int] = set()
        total = 0
        for job in self._prefilling:
            length = len(job.seq.prepared.input_ids)
            if job.done or job.alone or job.seq.wants_stop():
                break
            rows, kept = len(group) + 1, len(lengths | {length})
            padded = rows * max(lengths | {length})
            if padded > self._chunk or rows * kept > PREFILL_LOGIT_ROWS:
                break
            if budget is not None and total + length > budget:
                break
            group.append(job)
            lengths.add(length)
            total += length
        return group

    def _prefill_together(self, group: list[Prefill]) -> bool:
        """Prefill whole prompts as one right-padded batch; each row's keys and values join the slots.

        If the batch's forward pass fails (out of memory, say), its prompts go back to the front of
        the queue to be prefilled one by one, as they would have been without batching.

        Returns:
            Whether the batch's forward pass ran (False: the prompts were requeued).
        """
        for _ in group:
            self._prefilling.popleft()
        prompts = [job.seq.prepared.input_ids for job in group]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        lasts = sorted({n - 1 for n in lengths})  # the positions whose logits are kept, for every row
        try:
            ids = torch.tensor([[*p, *[0] * (width - len(p))] for p in prompts], device=self._device)
            mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=self._device)
            cache = self._new_cache()
            logits = self._model(
                input_ids=ids,
                attention_mask=mask,
                **{self._cache_kw: cache},
                use_cache=True,
                logits_to_keep=torch.tensor(lasts, device=self._device),
            ).logits
            mine = torch.tensor([lasts.index(n - 1) for n in lengths], device=self._device)
            first = logits[torch.arange(len(group), device=self._device), mine]
        except Exception:
            log.warning(
                "prefill of %d prompts together failed; each is prefilled alone", len(group), exc_info=True
            )
            for job in reversed(group):
                job.alone = True
                self._prefilling.appendleft(job)
            return False
        metrics.PROMPT_TOKENS_TOTAL.inc(sum(lengths))
        layers = _kv_layers(cache)
        rows: list[Layers] = [
            [(k[i : i + 1, :, :n], v[i : i + 1, :, :n]) for k, v in layers] for i, n in enumerate(lengths)
        ]
        try:
            self._join([(job.seq, row) for job, row in zip(group, rows, strict=True)], first)
        except Exception as exc:  # these requests fail; the batch goes on
            log.exception("joining %d prefilled prompts failed", len(group))
            for job in group:
                if not job.seq.ended:
                    job.seq.end(exc)
        return True

    def _join(
        self,
        prefilled: list[tuple[RequestState, Layers]],
        logits: torch.Tensor,
    ) -> None:
        """Stream prefilled requests' first tokens; each that is not ended by it joins the batch.

        Args:
            prefilled: Each request with its prompt's (keys, values) per layer, (1, heads, length, dim).
            logits: Each request's logits of its last prompt token, (requests, vocab).

        """
        tokens, finite = sample_batch(
            logits, [(seq.prepared.sampling, seq.generator) for seq, _ in prefilled]
        )
        for (seq, layers), token in zip(prefilled, Readback(tokens, finite).tokens(), strict=True):
            self._emit(seq, token)
            if token is not None and not seq.ended:
                self._slots.add(layers, token)
                self._batch.append(seq)

    def _decode_step(self) -> None:
        """Launch a step of the batch, handle the one launched `depth` steps before, drop who ended."""
        if self._batch:
            self._launched.append(self._launch())
        while len(self._launched) > self._depth:
            self._handle(self._launched.popleft())
        self._drop_ended()
        if not self._batch:
            self._launched.clear()  # what is left computed only requests that have ended

    def _launch(self) -> LaunchedStep:
        """Queue one decoding step; its tokens are sampled and become the next step's inputs on the device."""
        logits = self._decode()
        tokens, finite = sample_batch(logits, [(s.prepared.sampling, s.generator) for s in self._batch])
        self._slots.advance(tokens)
        return LaunchedStep(list(self._batch), Readback(tokens, finite))

    def _handle(self, step: LaunchedStep) -> None:
        """Hand a launched step's tokens to its requests; one that has ended since gets nothing."""
        for seq, token in zip(step.seqs, step.readback.tokens(), strict=True):
            if not seq.ended:
                self._emit(seq, token)

    def _emit(self, seq: RequestState, token: int | None) -> None:
        """Hand a sampled token to its request, and end the request when the token ends it."""
        if token is None:
            vram_metrics.NONFINITE_TOTAL.labels(str(self._device)).inc()
            seq.end(
                NonFiniteOutput(
                    f"the model produced non-finite logits (NaN/Inf) at token {seq.generated + 1}; "
                    "a higher precision (bf16 or fp32) avoids this"
                )
            )
            return
        now = time.perf_counter()
        seq.generated += 1
        metrics.GENERATED_TOKENS_TOTAL.inc()
        if seq.generated == 1:
            seq.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.submitted_at)
        seq.last_token_at = now
        if token in self._eos:
            self._finish(seq, "stop")
            return
        delta, stopped = seq.stream.push(token)
        if delta:
            seq.events.put(TextDelta(delta))
        if stopped:
            self._finish(seq, "stop_sequence")
        elif seq.generated >= seq.prepared.max_new_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: RequestState, reason: str) -> None:
        rest = seq.stream.flush()
        if rest:
            seq.events.put(TextDelta(rest))
        if seq.generated > 1:
            per_token = (seq.last_token_at - seq.first_token_at) / (seq.generated - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.observe(per_token)
        seq.end(Done(reason, seq.generated))

    def _cancel_if_stopped(self, seq: RequestState) -> bool:
        if not seq.wants_stop():
            return False
        seq.end(Cancelled("the request was cancelled"))
        return True

    def _drop_ended(self) -> None:
        """Drop the requests that ended from the batch (the others' rows move to the front)."""
        keep = [i for i, seq in enumerate(self._batch) if not seq.ended]
        if len(keep) == len(self._batch):
            return
        self._batch = [self._batch[i] for i in keep]
        self._slots.keep(keep)


def _kv_layers(cache: DynamicCache) -> Layers:
    """(keys, values) of each layer of a prefilled cache."""
    layers = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        layers.append((layer.keys, layer.values))
    return layers


def _nbytes(cache: DynamicCache) -> int:
    """Bytes of a prefill cache's keys and values so far (0 before its first chunk)."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
