"""Continuous batching: one thread owns the model; requests join the decode batch between steps.

Each step the scheduler (1) admits waiting requests while the batch has room: each is prefilled alone
(batch of one, no padding), gets its first token, and its KV cache is merged into the batch's cache,
left-padded to a common length; (2) drops sequences whose client went away; (3) runs one decoding
step for the whole batch (one token per sequence, attention mask over the padding, each sequence's
own position ids); (4) drops sequences that finished. Finished rows leave the batch at once and the
padding columns no remaining sequence needs are trimmed, so the cache never holds dead rows.

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
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from llm_server import metrics
from llm_server.generation import PreparedRequest, TextDelta
from llm_server.sampling import make_generator, next_token
from llm_server.stops import TextStream
from serving.errors import Cancelled, NonFiniteOutput, NotReady, ResourceExhausted
from vram import metrics as vram_metrics

log = logging.getLogger(__name__)

# cuDNN's attention (PyTorch's first choice for FP16/BF16 on Hopper) builds a plan for every new key
# length, about 55 ms each on an H200: a decode loop, whose key length grows by one every step, paid
# that at every step (12 s instead of 0.9 s for the first 200 tokens of the tiny model). The other
# kernels have no per-shape setup.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Done:
    """The scheduler's last event for a request that ended normally."""

    finish_reason: str
    completion_tokens: int


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
        self.last_token = -1
        self.submitted_at = time.perf_counter()
        self.first_token_at = self.last_token_at = 0.0

    def wants_stop(self) -> bool:
        """Whether the caller cancelled or its client went away."""
        if self.cancelled.is_set():
            return True
        try:
            return bool(self.should_stop())
        except Exception:  # a broken should_stop must not take the batch down
            log.exception("should_stop raised; cancelling the request")
            return True


class BatchScheduler:
    """Owns the model on one thread and decodes every admitted request in one batch.

    Args:
        model: The loaded causal LM (transformers Cache API).
        eos_ids: Token ids that end a sequence.
        max_batch_size: Sequences decoded together at most.
        max_queue: Requests that may wait for a slot; one more is refused (RESOURCE_EXHAUSTED).

    """

    def __init__(
        self, model: PreTrainedModel, eos_ids: frozenset[int], max_batch_size: int, max_queue: int
    ) -> None:
        self._model = model
        # transformers renamed past_key_values to cache (5.2x); accept both so either release runs.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._device = next(model.parameters()).device
        self._eos = eos_ids
        self._max_queue = max_queue
        self._max_batch = max_batch_size
        if max_batch_size > 1 and not all(type(x) is DynamicLayer for x in self._new_cache().layers):
            log.warning("the model's KV cache has non-standard layers; decoding one request at a time")
            self._max_batch = 1
        self._cv = threading.Condition()
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._closed = False
        self._batch: list[RequestState] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (batch, cache length): 1 real token, 0 padding
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
        self._thread.start()

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

    # -- the loop (scheduler thread only) ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                self._waiting = collections.deque(s for s in self._waiting if not s.cancelled.is_set())
                while not (self._waiting or self._batch or self._closed):
                    self._cv.wait()
                if self._closed:
                    break
                room = self._max_batch - len(self._batch)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                metrics.QUEUE_DEPTH.set(len(self._waiting))
            try:
                with torch.inference_mode(), sdpa_kernel(DECODE_ATTENTION):
                    for seq in joining:
                        self._join(seq)
                    self._select([i for i, s in enumerate(self._batch) if not self._cancel_if_stopped(s)])
                    if self._batch:
                        self._step()
            except Exception as exc:  # the batch's state is unknown: fail its requests, keep serving
                log.exception("decoding step failed for a batch of %d", len(self._batch))
                for seq in self._batch:
                    seq.events.put(exc)
                self._batch, self._cache, self._mask = [], None, None
            metrics.BATCH_SIZE.set(len(self._batch))
            metrics.KV_CACHE_BYTES.set(self._cache_bytes())
        with self._cv:
            for seq in [*self._waiting, *self._batch]:
                seq.events.put(NotReady("the LLM engine shut down before the request finished"))
            self._waiting.clear()
        self._batch, self._cache, self._mask = [], None, None

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self._model.config)

    def _join(self, seq: RequestState) -> None:
        """Prefill one request alone and merge its cache into the batch."""
        if self._cancel_if_stopped(seq):
            return
        try:
            ids = torch.tensor([seq.prepared.input_ids], dtype=torch.long, device=self._device)
            cache = self._new_cache()
            logits = self._model(
                input_ids=ids, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1
            ).logits
            metrics.PROMPT_TOKENS_TOTAL.inc(ids.shape[1])
            if self._accept(seq, logits[0, -1]):
                self._merge(seq, cache, ids.shape[1])
        except Exception as exc:  # this request fails; the batch goes on
            log.exception("prefill failed")
            seq.events.put(exc)

    def _step(self) -> None:
        """Decode one token for every sequence in the batch."""
        assert self._mask is not None
        inputs = torch.tensor([[s.last_token] for s in self._batch], dtype=torch.long, device=self._device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        logits = self._model(
            input_ids=inputs,
            attention_mask=self._mask,
            position_ids=positions,
            **{self._cache_kw: self._cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits
        self._select([i for i, s in enumerate(self._batch) if self._accept(s, logits[i, -1])])

    def _accept(self, seq: RequestState, logits: torch.Tensor) -> bool:
        """Sample the sequence's next token and emit its text. False when the sequence has ended."""
        if not bool(torch.isfinite(logits).all()):
            vram_metrics.NONFINITE_TOTAL.labels(str(self._device)).inc()
            seq.events.put(
                NonFiniteOutput(
                    f"the model produced non-finite logits (NaN/Inf) at token {seq.generated + 1}; "
                    "a higher precision (bf16 or fp32) avoids this"
                )
            )
            return False
        token = next_token(logits, seq.prepared.sampling, seq.generator)
        now = time.perf_counter()
        seq.generated += 1
        metrics.GENERATED_TOKENS_TOTAL.inc()
        if seq.generated == 1:
            seq.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.submitted_at)
        seq.last_token, seq.last_token_at = token, now
        if token in self._eos:
            return self._finish(seq, "stop")
        delta, stopped = seq.stream.push(token)
        if delta:
            seq.events.put(TextDelta(delta))
        if stopped:
            return self._finish(seq, "stop_sequence")
        if seq.generated >= seq.prepared.max_new_tokens:
            return self._finish(seq, "length")
        return True

    def _finish(self, seq: RequestState, reason: str) -> bool:
        rest = seq.stream.flush()
        if rest:
            seq.events.put(TextDelta(rest))
        if seq.generated > 1:
            per_token = (seq.last_token_at - seq.first_token_at) / (seq.generated - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.observe(per_token)
        seq.events.put(Done(reason, seq.generated))
        return False

    def _cancel_if_stopped(self, seq: RequestState) -> bool:
        if not seq.wants_stop():
            return False
        seq.events.put(Cancelled("the request was cancelled"))
        return True

    # -- the batch's KV cache ------------------------------------------------------------------------
    def _merge(self, seq: RequestState, cache: DynamicCache, length: int) -> None:
        """Add a prefilled sequence to the batch, left-padding whichever side is shorter."""
        mask = torch.ones((1, length), dtype=torch.long, device=self._device)
        if not self._batch:
            self._batch, self._cache, self._mask = [seq], cache, mask
            return
        assert self._cache is not None and self._mask is not None
        pad_new, pad_batch = max(0, self._mask.shape[1] - length), max(0, length - self._mask.shape[1])
        self._mask = torch.cat([F.pad(self._mask, (pad_batch, 0)), F.pad(mask, (pad_new, 0))])
        for into, new in zip(_layers(self._cache), _layers(cache), strict=True):
            keys, values = _kv(into)
            new_keys, new_values = _kv(new)
            into.keys = torch.cat([_pad_left(keys, pad_batch), _pad_left(new_keys, pad_new)])
            into.values = torch.cat([_pad_left(values, pad_batch), _pad_left(new_values, pad_new)])
        self._batch.append(seq)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows of the batch, then trim padding columns no row needs."""
        if len(keep) == len(self._batch):
            return
        if not keep:
            self._batch, self._cache, self._mask = [], None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self._device)
        self._batch = [self._batch[i] for i in keep]
        self._mask = self._mask[index]
        start = int(self._mask.any(dim=0).nonzero()[0])
        self._mask = self._mask[:, start:]
        for layer in _layers(self._cache):
            keys, values = _kv(layer)
            layer.keys, layer.values = keys[index, :, start:], values[index, :, start:]

    def _cache_bytes(self) -> int:
        if self._cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in _layers(self._cache) for t in _kv(layer))


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """Return the cache's layers (plain DynamicLayers: the scheduler checks that at start)."""
    return cast(list[DynamicLayer], cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(states: torch.Tensor, pad: int) -> torch.Tensor:
    """Left-pad (batch, heads, length, head_dim) states along the length."""
    return F.pad(states, (0, 0, pad, 0)) if pad else states
