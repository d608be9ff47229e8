"""SVD-XT through the video server over gRPC: end-to-end time and peak memory per plan.

    python -m bench.video --out bench/results/video.json   # on a GPU (builds the SVD-XT folder if missing)

Starts `python -m video_server` on the random-weight SVD-XT folder (bench/fullsize.py) under each
setting, sends one GenerateVideo (an image in, 25 frames at 1024x576, 25 steps, an mp4 out), and
records the wall time of the call and the request's peak allocated bytes the server reports.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from bench.common import header, write
from bench.fullsize import build_svd_xt
from gateway.stack import ServerProcess, free_port
from media.keyframe import render_keyframe
from scriptreel.video.v1 import video_service_pb2 as pb
from scriptreel.video.v1 import video_service_pb2_grpc as pb_grpc
from vram.sizes import parse_bytes

log = logging.getLogger("bench.video")
GiB = 2**30
RUNS: list[tuple[str, str, str, dict[str, str]]] = [  # (label, precision, budget, more settings)
    ("fp16", "fp16", "", {}),
    ("fp16, channels-last", "fp16", "", {"CHANNELS_LAST": "true"}),
    ("auto, 6 GiB budget", "auto", "6GiB", {}),
    ("auto, 4.5 GiB budget (the video's share of a 12 GB card)", "auto", "4608MiB", {}),
]


def run_one(
    folder: Path,
    precision: str,
    budget: str,
    steps: int,
    logs: Path,
    device: str = "cuda",
    size: tuple[int, int, int] = (1024, 576, 25),
    more: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a server with the setting, make one video, stop it."""
    env = {f"SCRIPTREEL_VIDEO_{k}": v for k, v in (more or {}).items()} | {
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
        logs / f"video-{precision}-{budget or 'none'}{'-' if more else ''}{'-'.join(more or {})}.log".lower(),
    )
    server.start()
    record: dict[str, Any] = {
        "pipeline": "svd-xt",
        "requested_precision": precision,
        "budget_bytes": parse_bytes(budget) or 0,
        "settings": more or {},
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
                split_guidance=plan.split_guidance,
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
            mp4_size = 0
            for event in stub.GenerateVideo(request, timeout=900):
                if event.WhichOneof("event") == "chunk":
                    mp4_size += len(event.chunk.data)
                elif event.WhichOneof("event") == "result":
                    result = event.result
            record["seconds"] = round(time.perf_counter() - start, 2)
            record.update(
                peak_bytes=result.memory.peak_allocated_bytes,
                mp4_bytes=mp4_size,
                reserved_bytes=result.memory.reserved_bytes,
            )
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        server.stop(60)
    log.info("%s", record)
    return record


def fidelity(folder: Path, steps: int, size: tuple[int, int, int], device: str = "cuda") -> dict[str, Any]:
    """FP16 against FP32 from the same seed and the same initial noise, in-process (diffusers).

    Both pipelines denoise the same FP32 noise (cast to their dtype) from the same image to final
    latents; each decodes its own latents in its own precision, as the server would. Reported: the
    relative L2 error of the FP16 latents against the FP32 ones, the PSNR of the FP16 frames against
    the FP32 frames (pixels in [0, 1]), and each run's seconds and peak. With random weights this is
    numerical agreement between the two precisions, not a quality score.
    """
    import torch
    from diffusers import StableVideoDiffusionPipeline

    width, height, frames = size
    image = Image.open(io.BytesIO(render_keyframe("a mountain bike", width, height, seed=1))).convert("RGB")
    shape = (1, frames, 4, height // 8, width // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    out: dict[str, Any] = {"steps": steps, "frames": frames, "width": width, "height": height}
    latents, videos = {}, {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        pipe = StableVideoDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            lat = pipe(
                image,
                width=width,
                height=height,
                num_frames=frames,
                num_inference_steps=steps,
                decode_chunk_size=8,
                latents=noise.to(device, dtype),
                generator=torch.Generator(device).manual_seed(7),
                output_type="latent",
            ).frames
            video = pipe.decode_latents(lat, frames, 8)
        if cuda:
            torch.cuda.synchronize()
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        out[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else 0
        latents[name] = lat.float().cpu()
        videos[name] = (video.float().cpu() / 2 + 0.5).clamp(0, 1)
        del pipe, lat, video
        if cuda:
            torch.cuda.empty_cache()
    error = (latents["fp16"] - latents["fp32"]).norm() / latents["fp32"].norm()
    mse = torch.mean((videos["fp16"] - videos["fp32"]) ** 2)
    out["latent_rel_error"] = float(error)
    out["psnr_db"] = float(10 * torch.log10(1 / mse)) if mse > 0 else float("inf")
    out["finite"] = bool(torch.isfinite(videos["fp16"]).all() and torch.isfinite(videos["fp32"]).all())
    log.info("fidelity: %s", out)
    return out


def main() -> None:
    """Run every setting and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/video.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--folder", type=Path, help="pipeline folder (default: the full-size SVD-XT)")
    parser.add_argument("--size", default="1024x576x25", help="WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--fidelity", action="store_true", help="also compare FP16 with FP32 in-process")
    parser.add_argument("--fidelity-steps", type=int, default=0, help="steps of that comparison (0: --steps)")
    parser.add_argument("--runs", default="", help="indexes of RUNS to run, e.g. 0,2 (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.folder or args.workdir / "svd"
    size = tuple(int(v) for v in args.size.split("x"))
    if not (folder / "model_index.json").exists():
        build_svd_xt(folder)
    result: dict[str, Any] = {**header(), "records": []}
    chosen = [RUNS[int(i)] for i in args.runs.split(",")] if args.runs else RUNS
    for _label, precision, budget, more in chosen:
        result["records"].append(
            run_one(folder, precision, budget, args.steps, args.out.parent / "logs", args.device, size, more)  # type: ignore[arg-type]
        )
        write(args.out, result)
    if args.fidelity:
        result["fidelity"] = fidelity(folder, args.fidelity_steps or args.steps, size, args.device)  # type: ignore[arg-type]
        write(args.out, result)


if __name__ == "__main__":
    main()
