"""The fastest launch configuration of llm_server.gemv's kernel for each one-row product of a step.

    python -m bench.gemv_sweep --apply      # on a GPU: FP16 weights, then the table into gemv.py
    python -m bench.gemv_sweep --weights int8,fp8 --apply --out bench/results/gemv_sweep_quantized.json

llm_server.gemv looks its launch configurations up (`MEASURED`) instead of tuning them at every
start, so they have to be measured once per GPU, and measured where they run: inside a CUDA graph,
one product after another on different weights, as in a decoding step. Inductor's tuner times each
candidate alone, on one weight, and its timings moved by up to 35% from one process to the next
(docs/BENCHMARKS.md, "Why batch 1 varies").

For each weight shape of one decoding step of the full-size GLM (bench.weight_placement's
`step_shapes`: q/k/v, output, gate-and-up, down, LM head), this fills as many weights as the step
has of that shape (28, 56 for the quantized plans' q and output, 1 for the LM head), captures their
products at each candidate configuration (rows per program x columns per iteration x warps,
`--rows`, `--columns`, `--warps`), and times the graph's replay (5 rounds of 30, median;
bench.weight_placement's `graph_ms`). `--weights` picks the stored element types: FP16, and the
INT8/FP8 of the quantized plans (random values, a scale per row; their steps keep q, k and v apart,
and the LM head in FP16). cuBLAS (F.linear) is timed the same way for FP16 weights, for reference.
The output lists every candidate per shape, fastest first, and ends with the `MEASURED` table;
`--apply` writes it into llm_server/gemv.py (replacing the entries of the same shape and weight
dtype), so the processes that run after it in the same checkout (bench.weight_placement, bench.llm)
use it.
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
from llm_server import gemv

log = logging.getLogger("bench.gemv_sweep")


def candidates(
    rows: list[int], columns: list[int], warps: list[int], in_features: int, itemsize: int = 2
) -> list[tuple[int, int, int]]:
    """The launch configurations worth trying for `in_features` columns of `itemsize`-byte weights.

    Iterations wider than the row (rounded up to a power of two) read nothing more, iterations of
    more than 4,096 16-bit columns were never faster (so 8,192 is for 1-byte weights), and more than
    llm_server.gemv.ACCUMULATORS fp32 accumulators per thread spill registers: all are left out.
    """
    widest = min(1 << max(0, in_features - 1).bit_length(), 8192 // itemsize)
    return [
        (r, c, w)
        for r, c, w in itertools.product(rows, columns, warps)
        if c <= widest and r * c <= gemv.ACCUMULATORS * 32 * w
    ]


WEIGHTS = {"fp16": torch.float16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def random_weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A weight as a model stores it: FP16 values, or INT8/FP8 ones (their scales apart)."""
    values = torch.empty(shape, dtype=torch.float16, device="cuda").normal_(0, 0.02)
    if dtype == torch.int8:
        return (values * 3000).round().clamp(-127, 127).to(torch.int8)
    return values if dtype == torch.float16 else (values * 10000).clamp(-448, 448).to(dtype)


def sweep(
    shape: tuple[int, int],
    count: int,
    configs: list[tuple[int, int, int]],
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Time `count` products of this shape per graph, each configuration (and cuBLAS for FP16)."""
    weights = [random_weight(shape, dtype) for _ in range(count)]
    scale = None if dtype == torch.float16 else torch.rand(shape[0], 1, device="cuda") / 1000
    x = torch.randn(1, shape[1], dtype=torch.float16, device="cuda")
    assert gemv.fits(x, weights[0], None, scale)
    cublas = graph_ms(lambda w, v: torch.nn.functional.linear(v, w), weights, x) if scale is None else None
    timed: list[dict[str, Any]] = []
    for config in configs:

        def product(w: torch.Tensor, v: torch.Tensor, c: tuple[int, int, int] = config) -> torch.Tensor:
            return gemv.run(v, w, None, c, scale)

        try:
            ms = graph_ms(product, weights, x)
        except Exception as exc:  # a configuration the compiler or the GPU refuses
            log.warning("%s %s: %s", shape, config, exc)
            continue
        timed.append({"config": list(config), "ms": round(ms, 4)})
    timed.sort(key=lambda t: t["ms"])
    itemsize = dtype.itemsize
    nbytes = count * shape[0] * shape[1] * itemsize
    best = timed[0]
    default = gemv.launch_config(*shape, dtype)
    return {
        "shape": list(shape),
        "dtype": gemv.dtype_name(dtype),
        "itemsize": itemsize,
        "products": count,
        "cublas_ms": None if cublas is None else round(cublas, 4),
        "best": {**best, "tb_per_s": round(nbytes / best["ms"] / 1e9, 3)},
        "default": next((t for t in timed if tuple(t["config"]) == default), None),
        "timed": timed,
    }


ENTRY = re.compile(r'^    \((\d+), (\d+), "(\w+)"\): .*$', re.M)


def table(shapes: list[dict[str, Any]]) -> str:
    """The `MEASURED` entries for these sweep results, one line per shape, as gemv.py spells them."""
    lines = []
    for found in shapes:
        best = ", ".join(str(v) for v in found["best"]["config"])
        out, inp = found["shape"]
        took = f"{found['best']['ms']} ms for {found['products']}"
        lines.append(f'    ({out}, {inp}, "{found["dtype"]}"): ({best}),  # {took}')
    return "\n".join(lines)


def apply(entries: str, source: Path) -> None:
    """Put these entries into the `MEASURED = {...}` table in `source`, replacing those of the same key.

    Entries of other keys (another element size, another model's shapes) stay, in their order.
    """
    text = source.read_text()
    pattern = re.compile(r"(^MEASURED: [^\n]*= \{\n)(.*?)(^\}$)", re.S | re.M)
    found = pattern.search(text)
    if not found:
        raise SystemExit(f"no MEASURED table in {source}")
    merged = {m.groups(): m[0] for m in ENTRY.finditer(found[2])}
    merged.update({m.groups(): m[0] for m in ENTRY.finditer(entries)})
    body = "\n".join(merged.values())
    source.write_text(text[: found.start(2)] + body + "\n" + text[found.end(2) :])


def main() -> None:
    """Sweep every shape of the step and write the results, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gemv_sweep.json"))
    parser.add_argument("--weights", default="fp16", help=f"comma-separated of {list(WEIGHTS)}")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--columns", default="1024,2048,4096,8192")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--apply", action="store_true", help="write the table into llm_server/gemv.py")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.gemv_sweep times a GPU kernel: it needs a GPU")
    rows, columns, warps = (
        [int(v) for v in option.split(",")] for option in (args.rows, args.columns, args.warps)
    )
    result: dict[str, Any] = {**header(), "shapes": []}
    for name in args.weights.split(","):
        dtype = WEIGHTS[name]
        shapes: dict[tuple[int, int], int] = {}
        for _, shape in step_shapes(quantized=dtype != torch.float16):
            shapes[shape] = shapes.get(shape, 0) + 1
        for shape, count in shapes.items():
            configs = candidates(rows, columns, warps, shape[1], dtype.itemsize)
            found = sweep(shape, count, configs, dtype)
            result["shapes"].append(found)
            log.info(
                "%s %s x %d: best %s, cuBLAS %s ms", name, shape, count, found["best"], found["cublas_ms"]
            )
            write(args.out, result)
            torch.cuda.empty_cache()
    entries = table(result["shapes"])
    print("MEASURED = {\n" + entries + "\n}")
    if args.apply:
        apply(entries, Path(gemv.__file__))


if __name__ == "__main__":
    main()
