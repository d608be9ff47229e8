"""One decoding step of the whole batch, replayed from a CUDA graph on a GPU.

A step runs the model on one token per row of the SlotCache. Shapes are bucketed: the batch rounds up
to a power of two (rows beyond the batch compute noise nobody reads) and the attended columns round up
to a power of two from 64 (the columns beyond `end` are masked out). On a GPU each (rows, columns)
bucket is captured once as a CUDA graph when the engine starts and replayed at every step: the whole
forward pass (hundreds of kernels) becomes one launch, and a 6B model decodes at the speed of its
weights' memory traffic instead of Python's. Elsewhere (CPU), or with graphs switched off, the same
bucketed forward pass runs eagerly, so the two paths compute the same thing.

A step's input tokens are already on the device, in the slots' `inputs`: the previous step's sampled
tokens (`SlotCache.advance`) or a joining row's first token (`SlotCache.add`). Nothing in a step waits
for the host, so the scheduler can launch step n+1 while the host still handles step n's tokens, which
reach it through a `Readback`.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedModel

from llm_server import fusion
from llm_server.slots import SlotCache

log = logging.getLogger(__name__)

MIN_WIDTH = 64
# Logged once the graphs are captured (bench.llm reads it from the server's log).
REPLAY_MESSAGE = "a one-row decoding step replays in %.3f ms (no host work)"
CACHE_MESSAGE = "compiled pieces: %d graphs from the inductor cache, %d compiled (cache %s)"


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from start below limit, then limit itself."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket(value: int, sizes: list[int]) -> int:
    """The smallest size that holds value."""
    return next(size for size in sizes if size >= value)


class DecodeStep:
    """Runs decoding steps over a SlotCache (see the module docstring).

    Args:
        model: The causal LM, its attention switched to the slots' (llm_server.attention) when it can.
        cache: The batch's slots.
        cache_kw: The name of the forward pass's cache argument ("cache" or "past_key_values").
        graphs: Capture CUDA graphs (ignored off CUDA).

    """

    def __init__(self, model: PreTrainedModel, cache: SlotCache, cache_kw: str, graphs: bool) -> None:
        self._model, self._cache, self._cache_kw = model, cache, cache_kw
        self._rows = buckets(cache.rows)
        self._widths = buckets(cache.capacity, min(MIN_WIDTH, cache.capacity))
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graphs = graphs and cache.device.type == "cuda"
        self.replay_ms: float | None = None  # a one-row step's replay (the smallest bucket), on a GPU
        # Compiled graphs at capture: (loaded from inductor's cache, compiled); None: nothing captured.
        self.cache_counts: tuple[int, int] | None = None
        if self.graphs:
            try:
                self._capture_all()
            except Exception:
                log.exception("CUDA graph capture failed; decoding eagerly (slower, same results)")
                self._graphs.clear()
                self.graphs = False
            else:
                self.replay_ms = self.time_replay((1, self._widths[0]))
                log.info(REPLAY_MESSAGE, self.replay_ms)

    def __call__(self) -> torch.Tensor:
        """Launch one step of every row on its input token in the slots; returns the logits, (rows, vocab).

        Nothing waits for the device. The caller samples the logits and hands the next tokens to
        `SlotCache.advance` before the next step; the logits of a graph are overwritten by the next
        replay, which runs after whatever the caller queued on them.
        """
        cache = self._cache
        n = cache.active
        shape = (bucket(n, self._rows), bucket(cache.open_column(), self._widths))
        if self.graphs:
            graph, logits = self._graphs[shape]
            graph.replay()
        else:
            logits = self._forward(*shape)
        return logits[:n]

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        ids, positions, mask = self._cache.bind(rows, width)
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: self._cache},
        )
        return out.logits[:, -1]

    def time_replay(self, shape: tuple[int, int], runs: int = 20) -> float:
        """Milliseconds per replay of one bucket's graph, back to back: the device's share of a step.

        What the compiled kernels cost in this process (inductor's tuning varies from one compilation
        to the next), to set against the time between tokens that clients see. The replays write
        noise into the slots, which hold no sequence yet (a joining row's are cleared).
        """
        graph, _ = self._graphs[shape]
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / runs * 1000

    def _capture_all(self) -> None:
        """Capture one graph per (rows, columns) bucket; they share one memory pool (never concurrent).

        Fused kernels (llm_server.fusion), where the model has them, are compiled in the warm-up and
        captured; outside the capture the model runs its eager modules.
        """
        started = time.perf_counter()
        hits, misses = fusion.inductor_cache_counts()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), fusion.compiled():
            # Warm-up outside capture, every bucket: compilation (a compiled piece may recompile for a
            # narrower view of the slots, and compiling inside a capture fails), cuBLAS workspaces.
            with torch.cuda.stream(side):
                for rows in self._rows:
                    for width in self._widths:
                        self._forward(rows, width)
            torch.cuda.current_stream().wait_stream(side)
            for rows in self._rows:
                for width in self._widths:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        logits = self._forward(rows, width)
                    self._graphs[(rows, width)] = (graph, logits)
        torch.cuda.synchronize()
        log.info(
            "captured %d CUDA graphs (rows %s x columns %s) in %.1f s",
            len(self._graphs),
            self._rows,
            self._widths,
            time.perf_counter() - started,
        )
        now_hits, now_misses = fusion.inductor_cache_counts()
        self.cache_counts = (now_hits - hits, now_misses - misses)
        log.info(CACHE_MESSAGE, *self.cache_counts, fusion.inductor_cache_dir())


class Readback:
    """A step's tokens on their way to the host, without stalling the device.

    On a GPU the tokens are copied into pinned host memory behind a CUDA event, so the device goes on
    with whatever is queued after them; `tokens()` waits for that event only. Elsewhere the tensor is
    already on the host.

    Args:
        tokens: Each row's sampled token, on the device.
        finite: Whether each row's logits were finite.

    """

    def __init__(self, tokens: torch.Tensor, finite: torch.Tensor) -> None:
        marked = torch.where(finite, tokens, -1)  # one tensor, one copy
        self._ready: torch.cuda.Event | None = None
        if marked.device.type == "cuda":
            self._host = torch.empty(marked.shape, dtype=marked.dtype, pin_memory=True)
            self._host.copy_(marked, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = marked

    def tokens(self) -> list[int | None]:
        """Each row's token, None where its logits were not finite (waits for the copy)."""
        if self._ready is not None:
            self._ready.synchronize()  # releases the GIL while it waits
        return [t if t >= 0 else None for t in self._host.tolist()]
