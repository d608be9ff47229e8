"""Does where the weights land in device memory change what a one-row decoding step costs?

    python -m bench.weight_placement --processes 3 --placements 8     # on a GPU

bench.replay_spread found the same cached kernels replaying a one-row step in 3.59 to 4.01 ms from
one process start to the next, each process steady. This isolates the weights' memory traffic: the
matrix-vector products of one decoding step of the full-size GLM (every layer's q/k/v, output, gate-up
and down projections, then the LM head, FP16), captured as one CUDA graph and replayed, with nothing
else in the step. Each process (`--processes` per allocator setting, expandable segments on and off)
places the weights `--placements` times, each time elsewhere: the allocator's cache is emptied and a
block of a different size is taken first. Per placement and per layout (one tensor per weight as a
model loads them, or one buffer holding them all), the products run (`--kernels`) as cuBLAS calls
(F.linear), as inductor's compiled one-row product (llm_server.fusion's `_linear`, a reduction tuned
in each process, one kernel per shape) and as llm_server.gemv's kernel (launch configurations fixed
per shape), each graph timed in 5 rounds of 30 replays; the medians give the step and its read
bandwidth. Each process also reports its inductor kernels' configurations and how they were chosen.

So the spread within a process (placements) says whether placement matters; the spread between
processes at the same placement says whether something else fixed at start does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import child_job, header, inductor_kernels, report, write

log = logging.getLogger("bench.weight_placement")
GiB = 1 << 30
ALLOCATORS = ("expandable_segments:True", "expandable_segments:False")


def step_shapes(quantized: bool = False) -> list[tuple[str, tuple[int, int]]]:
    """(kind, (out, in)) of every product of one GLM decoding step, in the order the step runs them.

    FP16 plans concatenate q/k/v into one product (llm_server.fusion's `qkv`); quantized plans keep
    the three, and keep the LM head in FP16 (left out here).
    """
    from bench.fullsize import glm_config

    c = glm_config()
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = (
        [("q", (q, c.hidden_size)), ("k", (kv, c.hidden_size)), ("v", (kv, c.hidden_size))]
        if quantized
        else [("qkv", (qkv, c.hidden_size))]
    )
    layer = [
        *attention,
        ("output", (c.hidden_size, c.num_attention_heads * c.head_dim)),
        ("gate_up", (2 * c.intermediate_size, c.hidden_size)),
        ("down", (c.hidden_size, c.intermediate_size)),
    ]
    head = [] if quantized else [("lm_head", (c.vocab_size, c.hidden_size))]
    return [*layer * c.num_hidden_layers, *head]


Shapes = list[tuple[str, tuple[int, int]]]
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Kernel3 = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def place(shapes: Shapes, layout: str, shift: int) -> tuple[list[torch.Tensor], Any]:
    """The weights, filled with noise, after a `shift`-byte block; returns (weights, the block)."""
    torch.cuda.empty_cache()
    block = torch.empty(shift, dtype=torch.uint8, device="cuda") if shift else None
    if layout == "flat":
        sizes = [o * i for _, (o, i) in shapes]
        flat = torch.empty(sum(sizes), dtype=torch.float16, device="cuda")
        weights = [part.view(shape) for part, (_, shape) in zip(flat.split(sizes), shapes, strict=True)]
    else:
        weights = [torch.empty(shape, dtype=torch.float16, device="cuda") for _, shape in shapes]
    for w in weights:
        w.normal_(0, 0.02)
    return weights, block


def graph_ms(
    kernel: Kernel, weights: list[torch.Tensor], x: torch.Tensor, rounds: int = 5, replays: int = 30
) -> float:
    """Median milliseconds per replay of a CUDA graph of `kernel`'s product of each weight with x."""

    def products() -> None:
        for w in weights:
            kernel(w, x[:, : w.shape[1]])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        products()  # warm-up: compilation, cuBLAS workspaces
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        products()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / replays * 1000)
    del graph
    return statistics.median(times)


def one_process(
    placements: int, seed: int, layouts: list[str], kernels: list[str], tune: str
) -> dict[str, Any]:
    """Time the step's products at `placements` placements, in each layout, with each kernel.

    `tune`: "coordesc" (the engine's: inductor's coordinate-descent tuning), "wide" (the same,
    checking all directions at radius 2), "off" (inductor's heuristic launch configuration).
    """
    import random

    import torch._inductor.config as inductor_config

    from llm_server import gemv
    from llm_server.fusion import _linear

    inductor_config.coordinate_descent_tuning = tune != "off"
    if tune == "wide":
        inductor_config.coordinate_descent_check_all_directions = True
        inductor_config.coordinate_descent_search_radius = 2
    shapes = step_shapes()
    total = sum(o * i * 2 for _, (o, i) in shapes)
    x = torch.randn(1, max(i for _, (_, i) in shapes), dtype=torch.float16, device="cuda")
    compiled: dict[tuple[int, ...], Kernel3] = {s: torch.compile(_linear, dynamic=False) for _, s in shapes}
    products: dict[str, Kernel] = {
        "cublas": lambda w, v: torch.nn.functional.linear(v, w),
        "inductor": lambda w, v: compiled[tuple(w.shape)](v, w, None),
        "gemv": lambda w, v: gemv.one_row_linear(v, w, None),
    }
    rng = random.Random(seed)
    records = []
    for p in range(placements):
        shift = 0 if p == 0 else rng.randrange(1, 12 * 512) * (2 << 20)  # up to 12 GiB, in 2 MiB steps
        for layout in layouts:
            weights, block = place(shapes, layout, shift)
            record: dict[str, Any] = {"placement": p, "shift_bytes": shift, "layout": layout}
            record["first_address_mod_1GiB"] = weights[0].data_ptr() % GiB
            for name in kernels:
                kernel = products[name]
                ms = graph_ms(kernel, weights, x)
                record[f"{name}_ms"] = round(ms, 4)
                record[f"{name}_tb_per_s"] = round(total / ms / 1e9, 3)
                for kind in dict(shapes):
                    some = [w for w, (k, _) in zip(weights, shapes, strict=True) if k == kind]
                    kind_ms = graph_ms(kernel, some, x)
                    record[f"{name}_{kind}_ms"] = round(kind_ms, 4)
            log.info("%s", record)
            records.append(record)
            del weights, some, block  # before the next placement empties the cache
    return {"weight_bytes": total, "records": records, "inductor_kernels": inductor_kernels()}


def summary(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    """min, median and max of `key` over records."""
    values = [r[key] for r in records]
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    """Run the processes, per allocator setting, and write every placement's timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/weight_placement.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--inductor-cache", type=Path, help="default: WORKDIR/inductor-cache-placement")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--placements", type=int, default=8)
    parser.add_argument(
        "--allocators", default=",".join(ALLOCATORS), help="PYTORCH_CUDA_ALLOC_CONF values, comma-separated"
    )
    parser.add_argument("--layouts", default="separate,flat")
    parser.add_argument("--kernels", default="cublas,inductor,gemv")
    parser.add_argument("--tune", choices=("coordesc", "wide", "off"), default="coordesc")
    parser.add_argument(
        "--cache-per-process", action="store_true", help="each process compiles and tunes anew"
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.job:
        spec = json.loads(args.job)
        measured = one_process(**spec)
        report(measured)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.weight_placement times device memory: it needs a GPU")
    cache = (args.inductor_cache or args.workdir / "inductor-cache-placement").resolve()
    layouts, kernels = args.layouts.split(","), args.kernels.split(",")
    result: dict[str, Any] = {**header(), "inductor_cache": str(cache), "tune": args.tune, "runs": []}
    for allocator in args.allocators.split(","):
        for i in range(args.processes):
            folder = cache / f"{allocator}-{i}" if args.cache_per_process else cache
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder), "PYTORCH_CUDA_ALLOC_CONF": allocator}
            job = {
                "placements": args.placements,
                "seed": i,
                "layouts": layouts,
                "kernels": kernels,
                "tune": args.tune,
            }
            run = child_job("bench.weight_placement", "--job", job, env, 900)
            for layout in layouts:
                for kernel in kernels:
                    chosen = [r for r in run.get("records", []) if r["layout"] == layout]
                    if chosen:
                        run[f"{layout}_{kernel}_ms"] = summary(chosen, f"{kernel}_ms")
            result["runs"].append({"allocator": allocator, "process": i, **run})
            brief = {k: v for k, v in run.items() if k not in ("records", "inductor_kernels")}
            log.info("%s process %d: %s", allocator, i, brief)
            write(args.out, result)


if __name__ == "__main__":
    main()
