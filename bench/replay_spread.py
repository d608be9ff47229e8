"""How much a decoding step's time varies between processes that run the same compiled kernels.

    python -m bench.replay_spread --processes 4 --out bench/results/replay_spread.json     # on a GPU

Starts `--processes` engines one after the other, each in its own process, on the full-size GLM in
FP16 with bench.llm's settings and one inductor cache directory: the first compiles and tunes, the
others load the same kernels and launch configurations from the cache (`compiled_graphs` says so).
In each process the one-row step's CUDA graph (`DecodeStep.time_replay`, 64 columns) is timed
`--samples` times, a second apart, while nvidia-smi samples the GPU's clocks, power and throttle
reasons; then one greedy stream of 256 tokens gives the decode rate the replay allows.

So the spread between processes (`replay_ms` medians) is what the same kernels cost from one start
to the next, and the spread inside one (`replay_ms_samples`) what one process sees over time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import child_job, header, inductor_kernels, report, write
from bench.llm import (
    Workload,
    compiled_graphs,
    decodable_folder,
    full_size_glm,
    server_settings,
)

log = logging.getLogger("bench.replay_spread")
SMI_FIELDS = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"


def sample_gpu(stop: threading.Event, period: float = 0.2) -> list[dict[str, str]]:
    """nvidia-smi's clocks, power, temperature and throttle reasons every `period`, until `stop` is set."""
    samples: list[dict[str, str]] = []
    query = ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits", "-i", "0"]
    while not stop.is_set():
        try:
            done = subprocess.run(query, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no nvidia-smi here: the replays still count
            return samples
        if done.returncode == 0:
            samples.append(dict(zip(SMI_FIELDS.split(","), done.stdout.strip().split(", "), strict=False)))
        stop.wait(period)
    return samples


def one_process(settings: dict[str, str], samples: int) -> dict[str, Any]:
    """Load the engine, time its one-row replay over time with the GPU's clocks, then decode."""
    from llm_server.__main__ import engine_config
    from llm_server.engine import Finished, GenerationRequest, LlmEngine
    from llm_server.settings import LlmSettings
    from serving.model_main import configure_allocator

    configure_allocator()
    engine = LlmEngine.load(engine_config(LlmSettings.model_validate(settings)))
    step = engine._scheduler._decode
    if not step.graphs:
        raise SystemExit("bench.replay_spread times CUDA graph replays: it needs a GPU")
    shape = (1, 64)
    stop = threading.Event()
    found: list[list[dict[str, str]]] = []
    watcher = threading.Thread(target=lambda: found.append(sample_gpu(stop)), daemon=True)
    watcher.start()
    replays = []
    for _ in range(samples):
        replays.append(step.time_replay(shape, runs=50))
        time.sleep(1.0)
    stop.set()
    watcher.join(20)
    prepared = engine.validate(GenerationRequest(prompt="Once upon a time,", max_new_tokens=256))
    list(engine.generate(prepared, lambda: False))  # warm-up
    start = time.perf_counter()
    tokens = list(engine.generate(prepared, lambda: False))[-1]
    assert isinstance(tokens, Finished)
    seconds = time.perf_counter() - start
    engine.close()
    return {
        "replay_ms": round(statistics.median(replays), 3),
        "replay_ms_samples": [round(r, 3) for r in replays],
        "replay_ms_at_capture": step.replay_ms,
        "decode_tokens_per_s": round(tokens.completion_tokens / seconds, 1),
        "compiled_graphs": compiled_graphs(step.cache_counts),
        "inductor_kernels": inductor_kernels(),
        "gpu_samples": found[0] if found else [],
    }


def main() -> None:
    """Run the processes one after the other and write what each saw."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/replay_spread.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--inductor-cache", type=Path, help="default: WORKDIR/inductor-cache")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.job:
        spec = json.loads(args.job)
        report(one_process(spec["settings"], spec["samples"]))
        return
    served, _ = decodable_folder(full_size_glm(args.workdir, "cuda"), args.workdir)
    settings = server_settings(served, "cuda", "fp16", Workload())
    cache = (args.inductor_cache or args.workdir / "inductor-cache").resolve()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True (the servers' default)")
    result: dict[str, Any] = {
        **header(),
        "allocator": allocator,
        "inductor_cache": str(cache),
        "processes": [],
    }
    for i in range(args.processes):
        record = child_job(
            "bench.replay_spread", "--job", {"settings": settings, "samples": args.samples}, env, 600
        )
        result["processes"].append({"process": i, **record})
        log.info(
            "process %d: %s",
            i,
            {k: v for k, v in record.items() if k not in ("gpu_samples", "inductor_kernels")},
        )
        write(args.out, result)
    medians = [p["replay_ms"] for p in result["processes"] if "replay_ms" in p]
    if medians:
        spread = {"min": min(medians), "max": max(medians), "max_over_min": max(medians) / min(medians)}
        result["replay_ms_spread"] = spread
    write(args.out, result)


if __name__ == "__main__":
    main()
