"""Where a decoding step's time goes (issue 4): graph replays, kernels, and what fusion changes.

    python -m bench.decode_profile --out bench/results/decode_profile.json      # on a GPU

Loads the full-size GLM (bench/fullsize.py; built if missing) in FP16 through LlmEngine (16 slots of
1024 tokens) and measures, for the grouped decode attention as matmuls and as SDPA, then with the
norms, MLPs and rotary embedding compiled (llm_server.fusion): the replay time of the captured CUDA
graphs per (rows, columns) bucket with no host work, and in-process decode tokens/s at batch 1 and
with 16 concurrent streams (256 new tokens each). A torch.profiler census of one eager step (kernel
launches and the most expensive kernels) is taken before and after fusion.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from bench.common import header, write
from bench.fullsize import build_glm
from llm_server import attention, fusion
from llm_server.decode import DecodeStep
from llm_server.engine import LlmEngine, LlmEngineConfig
from llm_server.generation import Finished, GenerationRequest
from vram.plan import Policy

SHAPES = ((1, 64), (1, 1024), (4, 256), (16, 256), (16, 1024))
PROMPT = "Write the script of a 20-second teaser for a mountain bike."


def replay_ms(step: DecodeStep, runs: int = 30) -> dict[str, float]:
    """Milliseconds per replay of each bucket's graph, host work excluded."""
    times = {}
    for rows, width in SHAPES:
        graph, _ = step._graphs[(rows, width)]
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            graph.replay()
        torch.cuda.synchronize()
        times[f"{rows}x{width}"] = round((time.perf_counter() - start) / runs * 1000, 3)
    return times


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


def census(step: DecodeStep) -> dict[str, Any]:
    """Kernel launches and the 12 costliest kernels (microseconds) of one eager step, 1 x 256."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        step._forward(1, 256)
        torch.cuda.synchronize()
    table = sorted(((e.key, e.count, e.device_time_total) for e in prof.key_averages()), key=lambda x: -x[2])
    return {
        "kernel_launches": sum(count for _, count, t in table if t > 0),
        "top": [(name[:80], count, round(t)) for name, count, t in table[:12]],
    }


def main() -> None:
    """Measure and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_profile.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    args = parser.parse_args()
    folder = args.workdir / "glm"
    if not (folder / "config.json").exists():
        build_glm(folder, tokenizer_dir=Path("models/llm"), device="cuda")
    config = LlmEngineConfig(
        model_dir=folder,
        device="cuda",
        policy=Policy(precision="fp16", allow_fallback=False),
        max_batch_size=16,
        max_context_tokens=1024,
        fuse_kernels=False,
    )
    engine = LlmEngine.load(config)
    scheduler = engine._scheduler
    result: dict[str, Any] = {**header()}

    def recapture() -> None:
        with torch.inference_mode():
            scheduler._decode = DecodeStep(engine.model, scheduler._slots, scheduler._cache_kw, True)

    for kernel in ("matmul", "sdpa"):
        attention.KERNEL = kernel
        recapture()
        result[kernel] = {**decode_rates(engine), "replay_ms": replay_ms(scheduler._decode)}
    result["eager_step"] = census(scheduler._decode)
    start = time.perf_counter()
    result["compiled"] = fusion.fuse(engine.model)
    with torch.inference_mode():
        for rows in (1, 2, 16):
            scheduler._decode._forward(rows, 256)
        ids = torch.randint(0, 1000, (1, 37), device="cuda")
        cache = {scheduler._cache_kw: DynamicCache(config=engine.model.config)}
        engine.model(input_ids=ids, **cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    result["compile_seconds"] = round(time.perf_counter() - start, 1)
    recapture()
    result["sdpa+fused"] = {**decode_rates(engine), "replay_ms": replay_ms(scheduler._decode)}
    result["fused_eager_step"] = census(scheduler._decode)
    write(args.out, result)
    engine.close()


if __name__ == "__main__":
    main()
