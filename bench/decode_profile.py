"""Where a decoding step's time goes (issue 4): graph replays, kernels, and what fusion changes.

    python -m bench.decode_profile --precision fp16 --variants sdpa+fused,sdpa+fused+tune+linears

Loads the full-size GLM (bench/fullsize.py; built if missing) in the given precision through
LlmEngine (16 slots of 1024 tokens) and, per variant (VARIANTS: the decode attention's kernel, and
which pieces llm_server.fusion compiles), recaptures the CUDA graphs and measures: the replay time of
each (rows, columns) bucket's graph with no host work, in-process decode tokens/s at batch 1 and with
16 concurrent streams (256 new tokens each), and a torch.profiler census of one step (kernel launches
and the costliest kernels), and a timeline of one stream's decoding (how long the device waits for
the host between steps). The model folder is served through its decodable twin (bench.llm), so every
token is detokenised and streamed as text, as in the server. Records are merged into --out per
(precision, variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import header, write
from bench.fullsize import build_glm
from bench.llm import decodable_folder
from llm_server import attention, fusion
from llm_server.decode import DecodeStep
from llm_server.engine import LlmEngine, LlmEngineConfig
from llm_server.generation import Finished, GenerationRequest
from vram.plan import Policy

SHAPES = ((1, 64), (1, 1024), (4, 256), (16, 256), (16, 1024))
log = logging.getLogger(__name__)

PROMPT = "Write the script of a 20-second teaser for a mountain bike."


def replay_ms(step: DecodeStep, runs: int = 30) -> dict[str, float]:
    """Milliseconds per replay of each bucket's graph, host work excluded."""
    return {f"{rows}x{width}": round(step.time_replay((rows, width), runs), 3) for rows, width in SHAPES}


def decode_rates(engine: LlmEngine) -> dict[str, float]:
    """In-process tokens/s: one stream, then 16 at once (greedy, 256 new tokens each)."""
    prepared = engine.validate(GenerationRequest(prompt=PROMPT, max_new_tokens=256))

    def generated() -> int:
        finished = list(engine.generate(prepared, lambda: False))[-1]
        assert isinstance(finished, Finished)
        return finished.completion_tokens

    generated()
    start = time.perf_counter()
    one = generated() / (time.perf_counter() - start)
    counts = [0] * 16

    def stream(i: int) -> None:
        counts[i] = generated()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(counts) / (time.perf_counter() - start)
    return {"batch1_tok_s": round(one, 1), "16_streams_tok_s": round(total, 1)}


def timeline(engine: LlmEngine, new_tokens: int = 128) -> dict[str, Any]:
    """One stream's decoding under torch.profiler: how much of the time the device computes.

    Kernels (those of graph replays included) are merged into busy intervals; a gap between two
    kernels longer than 20 us is the device waiting for the host. Reported per decoded token.
    """
    prepared = engine.validate(GenerationRequest(prompt=PROMPT, max_new_tokens=new_tokens))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        finished = list(engine.generate(prepared, lambda: False))[-1]
    assert isinstance(finished, Finished)
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    busy, gaps, end = 0.0, [], spans[0][0]
    for start, stop in spans:
        if start > end:
            gaps.append(start - end)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    wall = end - spans[0][0]
    long_gaps = [g for g in gaps if g > 20]
    tokens = finished.completion_tokens
    return {
        "tokens": tokens,
        "device_busy": round(busy / wall, 4),
        "idle_us_per_token": round(sum(long_gaps) / tokens, 1),
        "gaps_over_20us": len(long_gaps),
        "gap_us_p50": round(sorted(long_gaps)[len(long_gaps) // 2], 1) if long_gaps else 0.0,
        "wall_ms_per_token": round(wall / tokens / 1000, 3),
    }


def census(step: DecodeStep) -> dict[str, Any]:
    """Kernel launches and the 12 costliest kernels (microseconds) of one eager step, 1 x 256.

    Inside `fusion.compiled()` the step runs the compiled pieces, as the captured graphs do.
    """
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        step._forward(1, 256)
        torch.cuda.synchronize()
    table = sorted(((e.key, e.count, e.device_time_total) for e in prof.key_averages()), key=lambda x: -x[2])
    return {
        "kernel_launches": sum(count for _, count, t in table if t > 0),
        "top": [(name[:80], count, round(t)) for name, count, t in table[:12]],
    }


# Variant name -> (the decode attention's kernel, llm_server.attention.KERNEL; what llm_server.fusion
# compiles, None: nothing; and inductor settings changed for it, if any).
ONE_ROW = fusion.Fusion(linears="one-row", qkv=True, tune=True)
ONE_ROW_ATTENTION = dataclasses.replace(ONE_ROW, attention="sdpa")
STATIC_HALF = dataclasses.replace(fusion.HALF, split_mlp=False)
DYNAMIC_HALF = dataclasses.replace(STATIC_HALF, static=False)
ALL_DIRECTIONS = {"coordinate_descent_check_all_directions": True}
INDUCTOR_QUANTIZED = dataclasses.replace(fusion.QUANTIZED, split_mlp=False, gemv=False)
VARIANTS: dict[str, tuple[str, fusion.Fusion | None] | tuple[str, fusion.Fusion | None, dict[str, Any]]] = {
    "matmul": ("matmul", None),
    "sdpa": ("sdpa", None),
    "sdpa+fused": ("sdpa", fusion.NOTHING_MORE),
    "sdpa+fused+tune": ("sdpa", fusion.Fusion(tune=True)),
    "sdpa+fused+tune+linears": ("sdpa", fusion.Fusion(linears="all", tune=True)),
    # One product for q/k/v, and compiled Linears for one-row steps only; then a compiled attention.
    "sdpa+fused+qkv+one-row": ("sdpa", ONE_ROW),
    "sdpa+fused+qkv+one-row+attention": ("sdpa", ONE_ROW_ATTENTION),
    "matmul+fused+qkv+one-row+attention": ("sdpa", DYNAMIC_HALF),  # FP16/BF16 plans' set before static
    # The quantized plans' set until 2026-11-29: every product compiled (inductor's reductions).
    "sdpa+fused+tune+linears+matmul-attention": ("sdpa", INDUCTOR_QUANTIZED),
    # Pieces compiled static first, dynamic only in the sizes that change (Fusion.static).
    "half+static": ("sdpa", STATIC_HALF),
    "half+static+split-mlp": ("sdpa", dataclasses.replace(fusion.HALF, gemv=False)),  # until gemv
    # One-row products by llm_server.gemv's kernel, launch configurations fixed per shape.
    "half+gemv": ("sdpa", fusion.HALF),  # the FP16/BF16 default since 2026-11-29
    "half+all-directions": ("sdpa", DYNAMIC_HALF, ALL_DIRECTIONS),
    "half+static+all-directions": ("sdpa", STATIC_HALF, ALL_DIRECTIONS),
    "quantized+static": ("sdpa", dataclasses.replace(INDUCTOR_QUANTIZED, static=True)),
    # One-row INT8/FP8 products by llm_server.gemv's kernel, scaled per row; the MLP split for it.
    "quantized+gemv": ("sdpa", fusion.QUANTIZED),  # the INT8/FP8 default since 2026-11-29
}


def measure_variant(engine: LlmEngine, name: str) -> dict[str, Any]:
    """Fuse (or not) as the variant says, recapture the graphs, and measure them."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    scheduler = engine._scheduler
    fusion.unfuse(engine.model)
    torch._dynamo.reset()  # forget kernels compiled under another variant's settings
    kernel, fused, *more = VARIANTS[name]
    overrides = more[0] if more else {}
    # As at start (only a variant's `tune` sets the first), then the variant's own settings.
    inductor_config.coordinate_descent_tuning = False
    inductor_config.coordinate_descent_check_all_directions = False
    for key, value in overrides.items():
        setattr(inductor_config, key, value)
    attention.KERNEL = kernel
    record: dict[str, Any] = {"variant": name, "compiled": [], "inductor": overrides}
    start = time.perf_counter()
    if fused is not None:
        record["compiled"] = fusion.fuse(engine.model, fused)
    with torch.inference_mode():
        scheduler._decode = DecodeStep(engine.model, scheduler._slots, scheduler._cache_kw, True)
    torch.cuda.synchronize()
    record["capture_seconds"] = round(time.perf_counter() - start, 1)
    record["coordinate_descent_tuning"] = bool(inductor_config.coordinate_descent_tuning)
    record |= decode_rates(engine)
    record["timeline"] = timeline(engine)
    record["replay_ms"] = replay_ms(scheduler._decode)
    with fusion.compiled():
        record["step"] = census(scheduler._decode)
    return record


def main() -> None:
    """Measure each variant and merge its record into --out (same precision and variant replaced)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_profile.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--precision", default="fp16", help="fp16, bf16, int8 or fp8")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {list(VARIANTS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.workdir / "glm"
    if not (folder / "config.json").exists():
        build_glm(folder, tokenizer_dir=Path("models/llm"), device="cuda")
    folder, _ = decodable_folder(folder, args.workdir)
    config = LlmEngineConfig(
        model_dir=folder,
        device="cuda",
        policy=Policy(precision=args.precision, allow_fallback=False),
        max_batch_size=16,
        max_context_tokens=1024,
        fuse_kernels=False,
    )
    engine = LlmEngine.load(config)
    run_header = header()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {**results, **{k: v for k, v in run_header.items() if k in ("gpu", "date")}}
    results.setdefault("records", [])
    for name in args.variants.split(","):
        try:
            record = {"precision": args.precision, **measure_variant(engine, name)}
        except Exception as exc:  # one variant failing leaves the others' figures
            log.exception("variant %s failed", name)
            record = {"precision": args.precision, "variant": name, "error": repr(exc)[:500]}
        log.info("%s", record)
        key = (record["precision"], record["variant"])
        results["records"] = [r for r in results["records"] if (r["precision"], r["variant"]) != key]
        results["records"].append(record | run_header)
        write(args.out, results)
    engine.close()


if __name__ == "__main__":
    main()
