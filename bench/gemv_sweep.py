"""The fastest launch configuration of llm_server.gemv's kernel for each one-row product of a step.

    python -m bench.gemv_sweep --out bench/results/gemv_sweep.json     # on a GPU (not run yet)
    python -m bench.gemv_sweep --apply      # the same, then writes the table into llm_server/gemv.py

llm_server.gemv looks its launch configurations up (`MEASURED`) instead of tuning them at every
start, so they have to be measured once per GPU, and measured where they run: inside a CUDA graph,
one product after another on different weights, as in a decoding step. Inductor's tuner times each
candidate alone, on one weight, and its timings moved by up to 35% from one process to the next
(docs/BENCHMARKS.md, "Why batch 1 varies").

For each weight shape of one decoding step of the full-size GLM (bench.weight_placement's
`step_shapes`: q/k/v, output, gate-and-up, down, LM head), this fills as many weights as the step has
of that shape (28, or 1 for the LM head), captures their products at each candidate configuration
(rows per program x columns per iteration x warps, `--rows`, `--columns`, `--warps`), and times the
graph's replay (5 rounds of 30, median; bench.weight_placement's `graph_ms`). cuBLAS (F.linear) is
timed the same way for reference. The output lists every candidate per shape, fastest first, and ends
with the `MEASURED` table; `--apply` writes it into llm_server/gemv.py in place of the one there, so
the processes that run after it in the same checkout (bench.weight_placement, bench.llm) use it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
from pathlib import Path
from typing import Any

import torch

from bench.common import header, write
from bench.weight_placement import graph_ms, step_shapes

log = logging.getLogger("bench.gemv_sweep")


def candidates(
    rows: list[int], columns: list[int], warps: list[int], in_features: int
) -> list[tuple[int, int, int]]:
    """The launch configurations worth trying for `in_features` columns.

    Iterations wider than the row (rounded up to a power of two) read nothing more, and more than 64
    fp32 accumulators per thread spill registers: both are left out.
    """
    widest = 1 << max(0, in_features - 1).bit_length()
    return [
        (r, c, w)
        for r, c, w in itertools.product(rows, columns, warps)
        if c <= widest and r * c <= 64 * 32 * w
    ]


def sweep(shape: tuple[int, int], count: int, configs: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Time `count` products of this shape per graph, cuBLAS and each configuration."""
    from llm_server import gemv

    weights = [torch.empty(shape, dtype=torch.float16, device="cuda").normal_(0, 0.02) for _ in range(count)]
    x = torch.randn(1, shape[1], dtype=torch.float16, device="cuda")
    assert gemv.fits(x, weights[0], None)
    cublas = graph_ms(lambda w, v: torch.nn.functional.linear(v, w), weights, x)
    timed: list[dict[str, Any]] = []
    for config in configs:

        def product(w: torch.Tensor, v: torch.Tensor, c: tuple[int, int, int] = config) -> torch.Tensor:
            return gemv.run(v, w, None, c)

        try:
            ms = graph_ms(product, weights, x)
        except Exception as exc:  # a configuration the compiler or the GPU refuses
            log.warning("%s %s: %s", shape, config, exc)
            continue
        timed.append({"config": list(config), "ms": round(ms, 4)})
    timed.sort(key=lambda t: t["ms"])
    nbytes = count * shape[0] * shape[1] * 2
    best = timed[0]
    return {
        "shape": list(shape),
        "products": count,
        "cublas_ms": round(cublas, 4),
        "best": {**best, "tb_per_s": round(nbytes / best["ms"] / 1e9, 3)},
        "default": next((t for t in timed if tuple(t["config"]) == gemv.launch_config(*shape)), None),
        "timed": timed,
    }


def table(shapes: list[dict[str, Any]]) -> str:
    """The `MEASURED` entries for these sweep results, one line per shape, as gemv.py spells them."""
    lines = []
    for found in shapes:
        best = ", ".join(str(v) for v in found["best"]["config"])
        out, inp = found["shape"]
        lines.append(f"    ({out}, {inp}): ({best}),  # {found['best']['ms']} ms for {found['products']}")
    return "\n".join(lines)


def apply(entries: str, source: Path) -> None:
    """Replace the entries of the `MEASURED = {...}` table in `source` with these."""
    text = source.read_text()
    pattern = re.compile(r"(^MEASURED: [^\n]*= \{\n)(.*?)(^\}$)", re.S | re.M)
    if not pattern.search(text):
        raise SystemExit(f"no MEASURED table in {source}")
    source.write_text(pattern.sub(lambda m: m[1] + entries + "\n" + m[3], text, count=1))


def main() -> None:
    """Sweep every shape of the step and write the results, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gemv_sweep.json"))
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--columns", default="1024,2048,4096")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--apply", action="store_true", help="write the table into llm_server/gemv.py")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.gemv_sweep times a GPU kernel: it needs a GPU")
    rows, columns, warps = (
        [int(v) for v in option.split(",")] for option in (args.rows, args.columns, args.warps)
    )
    shapes: dict[tuple[int, int], int] = {}
    for _, shape in step_shapes():
        shapes[shape] = shapes.get(shape, 0) + 1
    result: dict[str, Any] = {**header(), "shapes": []}
    for shape, count in shapes.items():
        found = sweep(shape, count, candidates(rows, columns, warps, shape[1]))
        result["shapes"].append(found)
        log.info("%s x %d: best %s, cuBLAS %.4f ms", shape, count, found["best"], found["cublas_ms"])
        write(args.out, result)
        torch.cuda.empty_cache()
    entries = table(result["shapes"])
    print("MEASURED = {\n" + entries + "\n}")
    if args.apply:
        from llm_server import gemv

        apply(entries, Path(gemv.__file__))


if __name__ == "__main__":
    main()
