"""SVD-XT through the video server over gRPC: end-to-end time and peak memory per plan.

    python -m bench.video --out bench/results/video.json   # on a GPU (builds the SVD-XT folder if missing)

Starts `python -m video_server` on the random-weight SVD-XT folder (bench/fullsize.py) under each
setting, sends one GenerateVideo (an image in, 25 frames at 1024x576, 25 steps, an mp4 out), and
records the wall time of the call and the request's peak allocated bytes the server reports.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import header, write
from bench.fullsize import build_svd_xt
from gateway.stack import ServerProcess, free_port
from media.keyframe import render_keyframe
from scriptreel.video.v1 import video_service_pb2 as pb
from scriptreel.video.v1 import video_service_pb2_grpc as pb_grpc

log = logging.getLogger("bench.video")
GiB = 2**30
RUNS = [  # (label, precision, budget)
    ("fp16", "fp16", ""),
    ("auto, 6 GiB budget", "auto", "6GiB"),
]


def run_one(
    folder: Path,
    precision: str,
    budget: str,
    steps: int,
    logs: Path,
    device: str = "cuda",
    size: tuple[int, int, int] = (1024, 576, 25),
) -> dict[str, Any]:
    """Start a server with the setting, make one video, stop it."""
    env = {
        "SCRIPTREEL_VIDEO_MODEL_DIR": str(folder),
        "SCRIPTREEL_VIDEO_DEVICE": device,
        "SCRIPTREEL_VIDEO_PRECISION": precision,
        "SCRIPTREEL_VIDEO_VRAM_BUDGET": budget,
        "SCRIPTREEL_VIDEO_PORT": str(free_port()),
        "SCRIPTREEL_VIDEO_METRICS_PORT": "-1",
    }
    server = ServerProcess(
        "video",
        "video_server",
        int(env["SCRIPTREEL_VIDEO_PORT"]),
        -1,
        env,
        logs / f"video-{precision}-{budget or 'none'}.log",
    )
    server.start()
    record: dict[str, Any] = {
        "pipeline": "svd-xt",
        "requested_precision": precision,
        "budget_bytes": int(budget.removesuffix("GiB")) * GiB if budget else 0,
        "frames": size[2],
        "width": size[0],
        "height": size[1],
        "steps": steps,
    }
    try:
        server.wait_serving(300)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.VideoServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            plan = info.info.plan
            record.update(
                precision=plan.precision,
                offload=plan.offload,
                keep_fp32=list(plan.keep_fp32),
                decode_chunk_size=plan.decode_chunk_size,
                forward_chunking=plan.forward_chunking,
                predicted_peak_bytes=plan.predicted_peak_bytes,
                plan=plan.reason,
            )
            request = pb.GenerateVideoRequest(
                image=render_keyframe("a mountain bike", size[0], size[1], seed=1),
                width=size[0],
                height=size[1],
                num_frames=size[2],
                num_inference_steps=steps,
                seed=7,
            )
            start = time.perf_counter()
            size = 0
            for event in stub.GenerateVideo(request, timeout=900):
                if event.WhichOneof("event") == "chunk":
                    size += len(event.chunk.data)
                elif event.WhichOneof("event") == "result":
                    result = event.result
            record["seconds"] = round(time.perf_counter() - start, 2)
            record.update(
                peak_bytes=result.memory.peak_allocated_bytes,
                mp4_bytes=size,
                reserved_bytes=result.memory.reserved_bytes,
            )
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        server.stop(60)
    log.info("%s", record)
    return record


def main() -> None:
    """Run every setting and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/video.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--folder", type=Path, help="pipeline folder (default: the full-size SVD-XT)")
    parser.add_argument("--size", default="1024x576x25", help="WIDTHxHEIGHTxFRAMES")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.folder or args.workdir / "svd"
    size = tuple(int(v) for v in args.size.split("x"))
    if not (folder / "model_index.json").exists():
        build_svd_xt(folder)
    result: dict[str, Any] = {**header(), "records": []}
    for _label, precision, budget in RUNS:
        result["records"].append(
            run_one(folder, precision, budget, args.steps, args.out.parent / "logs", args.device, size)
        )  # type: ignore[arg-type]
        write(args.out, result)


if __name__ == "__main__":
    main()
