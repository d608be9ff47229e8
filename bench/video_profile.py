"""Where an SVD-XT request's time goes (issue 5): stages and per-step time under each setting.

    python -m bench.video_profile --out bench/results/video_profile.json          # on a GPU

Loads the full-size SVD-XT (bench/fullsize.py; built if missing) through the server's own engine
(`VideoEngine.load`, in-process, one fresh process per variant so budgets, cuDNN and compile state
never leak between them) and renders the same request twice (1024x576, 25 frames, `--steps` steps):
the first pays one-time costs (cuDNN's algorithm timing, compilation), the second is timed. From the
engine's own events it splits the second request into stages: image encoding and the first step,
each denoising step (median), VAE decoding (with the conversion to frames), and mp4 encoding; then
projects the 25-step end-to-end time as total + (25 - steps) x median step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import header, write

log = logging.getLogger("bench.video_profile")
GiB = 2**30
FULL_STEPS = 25
# name -> VideoEngineConfig fields ("precision", "budget" and "offload" go to the Policy)
VARIANTS: dict[str, dict[str, Any]] = {
    "fp16": {"precision": "fp16"},
    "auto 6GiB": {"precision": "auto", "budget": 6 * GiB},
    "auto 6GiB plan, no budget": {
        "precision": "fp8",
        "offload": "model",
        "decode_chunk_size": 2,
        "forward_chunking": True,
        "split_guidance": True,
    },
    # The 6 GiB plan since the knob tier (FP8, no offload, every knob), and FP16 with the same knobs.
    "fp8 knobs": {
        "precision": "fp8",
        "decode_chunk_size": 2,
        "forward_chunking": True,
        "split_guidance": True,
    },
    "fp16 knobs": {
        "precision": "fp16",
        "decode_chunk_size": 2,
        "forward_chunking": True,
        "split_guidance": True,
    },
    "fp16 split-guidance": {"precision": "fp16", "split_guidance": True},
    "fp16 forward-chunking": {"precision": "fp16", "forward_chunking": True},
    "fp8": {"precision": "fp8"},
    "fp16 group offload 6GiB": {"precision": "fp16", "offload": "group", "budget": 6 * GiB},
    "fp16 decode-chunk-25": {"precision": "fp16", "decode_chunk_size": 25},
    # Speed settings (issue 5): torch.compile of the UNet and the VAE decoder (compiled at load, in the
    # warm-up at 1024x576x25: load_seconds holds the compilation), channels-last convolutions, both.
    "fp16 compile": {"precision": "fp16", "compile": True},
    "fp16 channels-last": {"precision": "fp16", "channels_last": True},
    "fp16 compile channels-last": {"precision": "fp16", "compile": True, "channels_last": True},
    "fp16 compile decode-chunk-25": {"precision": "fp16", "compile": True, "decode_chunk_size": 25},
    "fp32": {"precision": "fp32"},  # not run by default (--variants fp32): the CPU dry run's
}
DEFAULT = [name for name in VARIANTS if name != "fp32"]


def profile_variant(
    folder: Path, fields: dict[str, Any], steps: int, device: str, size: tuple[int, ...]
) -> dict[str, Any]:
    """Load one engine with `fields` and time two identical requests (this process only)."""
    import torch

    from media.keyframe import render_keyframe
    from video_server.engine import VideoEngine, VideoEngineConfig
    from video_server.params import Chunk, Progress, Result, VideoParams
    from video_server.pipelines import is_compiled
    from vram.plan import Policy

    fields = dict(fields)
    policy = Policy(
        precision=fields.pop("precision"),
        budget_bytes=fields.pop("budget", None),
        offload=fields.pop("offload", "auto"),
        supports_offload=True,
    )
    started = time.perf_counter()
    engine = VideoEngine.load(VideoEngineConfig(model_dir=folder, device=device, policy=policy, **fields))
    out: dict[str, Any] = {
        "load_seconds": round(time.perf_counter() - started, 1),
        "plan": engine.plan.reason,
        "precision": engine.plan.precision,
        "offload": engine.plan.offload,
        "knobs": {k: getattr(engine.knobs, k) for k in engine.knobs.__dataclass_fields__},
        "compiled": is_compiled(engine.pipe, engine.family),
    }
    width, height, frames = size
    image = render_keyframe("a mountain bike", width, height, seed=1)
    params = VideoParams(
        image=image, width=width, height=height, num_frames=frames, num_inference_steps=steps, seed=7
    )
    for attempt in ("first", "second"):
        marks: list[tuple[str, float]] = [("start", time.perf_counter())]
        result = None
        for event in engine.generate(params, lambda: False):
            now = time.perf_counter()
            if isinstance(event, Progress):
                marks.append((f"{event.stage}{event.step}", now))
            elif isinstance(event, Chunk) and not any(m[0] == "chunk" for m in marks):
                marks.append(("chunk", now))
            elif isinstance(event, Result):
                result = event
        end = time.perf_counter()
        at = dict(marks)
        step_marks = [at[f"denoise{i}"] for i in range(1, steps + 1)]
        step_times = [b - a for a, b in itertools.pairwise(step_marks)]
        median = statistics.median(step_times) if step_times else step_marks[0] - at["start"]
        total = end - at["start"]
        out[attempt] = {
            "seconds": round(total, 2),
            "encode_and_first_step": round(step_marks[0] - at["start"], 3),
            "step_median": round(median, 4),
            "decode": round(at["encode1"] - at["decode1"], 3),
            "mp4": round(at["chunk"] - at["encode1"], 3),
            "projected_25_steps": round(total + (FULL_STEPS - steps) * median, 2),
            "peak_bytes": result.memory.peak_allocated_bytes if result else None,
            "reserved_bytes": result.memory.reserved_bytes if result else None,
        }
    if device.startswith("cuda"):
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def main() -> None:
    """Run each variant in a fresh process and write the JSON after each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/video_profile.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--folder", type=Path, help="pipeline folder (default: the full-size SVD-XT)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps of each timed request")
    parser.add_argument("--size", default="1024x576x25", help="WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--variants", default="", help="names of VARIANTS, '|'-separated (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: profile this variant, print JSON
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.folder or args.workdir / "svd"
    if args.one:
        size = tuple(int(v) for v in args.size.split("x"))
        print(
            "RESULT " + json.dumps(profile_variant(folder, VARIANTS[args.one], args.steps, args.device, size))
        )
        return
    if not (folder / "model_index.json").exists():
        from bench.fullsize import build_svd_xt

        build_svd_xt(folder)
    result: dict[str, Any] = {**header(), "steps": args.steps, "records": []}
    for name in args.variants.split("|") if args.variants else DEFAULT:
        command = [sys.executable, "-m", "bench.video_profile", "--one", name, "--folder", str(folder)]
        command += ["--steps", str(args.steps), "--device", args.device, "--size", args.size]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        record: dict[str, Any] = {"variant": name, "settings": VARIANTS[name]}
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            record.update(json.loads(lines[-1][len("RESULT ") :]))
        else:
            record["error"] = (done.stderr or done.stdout)[-3000:]
        log.info("%s", record)
        result["records"].append(record)
        write(args.out, result)


if __name__ == "__main__":
    main()
