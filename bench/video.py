"""SVD-XT and CogVideoX-2b through the video server over gRPC: end-to-end time and peak memory per plan.

    python -m bench.video --out bench/results/video.json                            # SVD-XT
    python -m bench.video --pipeline cogvideox-2b --out bench/results/video.json    # CogVideoX-2b
    python -m bench.video --runs 0 --setting COMPILE=true                           # + server settings

Starts `python -m video_server` on the random-weight full-size folder (bench/fullsize.py; built into
--workdir if missing) under each setting, sends one GenerateVideo at the pipeline's native size and
records the wall time of the call and the request's peak allocated bytes the server reports. SVD-XT:
an image in, 25 frames at 1024x576, 25 steps; CogVideoX-2b: a prompt in, 49 frames at 720x480, 50
steps, guidance 6; an mp4 out (bench/video_pipelines.py says how each is built and asked). --fidelity
compares FP16 with FP32 in-process.

--out is merged, not overwritten: a record of this run replaces the file's record of the same
pipeline and setting (precision, budget, settings); every other record stays. Each record carries the
GPU, date, command and versions of the run that made it, so records of several runs can share a file.

--setting adds server settings (environment variables without their SCRIPTREEL_VIDEO_ prefix) to every
chosen run; they join the record's "settings", so such records never replace those of the plain runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import header, write
from bench.video_pipelines import PIPELINES, SEED, Run, VideoBench
from gateway.stack import ServerProcess, free_port
from scriptreel.video.v1 import video_service_pb2 as pb
from scriptreel.video.v1 import video_service_pb2_grpc as pb_grpc
from vram.sizes import parse_bytes

log = logging.getLogger("bench.video")


def run_one(
    bench: VideoBench,
    folder: Path,
    run: Run,
    steps: int,
    logs: Path,
    device: str = "cuda",
    size: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Start a server with the run's setting, make one video, stop it."""
    _label, precision, budget, more = run
    size = size or bench.size
    env = {f"SCRIPTREEL_VIDEO_{k}": v for k, v in more.items()} | {
        "SCRIPTREEL_VIDEO_MODEL_DIR": str(folder),
        "SCRIPTREEL_VIDEO_DEVICE": device,
        "SCRIPTREEL_VIDEO_PRECISION": precision,
        "SCRIPTREEL_VIDEO_VRAM_BUDGET": budget,
        "SCRIPTREEL_VIDEO_PORT": str(free_port()),
        "SCRIPTREEL_VIDEO_METRICS_PORT": "-1",
    }
    name = "-".join(["video", bench.name, precision, budget or "none", *more]).lower()
    server = ServerProcess(
        "video", "video_server", int(env["SCRIPTREEL_VIDEO_PORT"]), -1, env, logs / f"{name}.log"
    )
    server.start()
    record: dict[str, Any] = {
        "pipeline": bench.name,
        "requested_precision": precision,
        "budget_bytes": parse_bytes(budget) or 0,
        "settings": more,
        "frames": size[2],
        "width": size[0],
        "height": size[1],
        "steps": steps,
        "guidance_scale": bench.guidance,
    }
    try:
        server.wait_serving(600)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.VideoServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).info
            plan = info.plan
            record.update(
                parameter_count=info.parameter_count,
                precision=plan.precision,
                offload=plan.offload,
                keep_fp32=list(plan.keep_fp32),
                decode_chunk_size=plan.decode_chunk_size,
                forward_chunking=plan.forward_chunking,
                vae_tiling=plan.vae_tiling,
                split_guidance=plan.split_guidance,
                predicted_peak_bytes=plan.predicted_peak_bytes,
                plan=plan.reason,
            )
            start = time.perf_counter()
            mp4_size = 0
            for event in stub.GenerateVideo(bench.request(size, steps), timeout=1800):
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
        record["error"] = error_text(exc)
    finally:
        server.stop(60)
    log.info("%s", record)
    return record


def server_settings(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs as server settings: keys upper-cased, without the SCRIPTREEL_VIDEO_ prefix."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--setting wants KEY=VALUE, got {pair!r}")
        settings[key.upper().removeprefix("SCRIPTREEL_VIDEO_")] = value
    return settings


def error_text(exc: Exception, limit: int = 2000) -> str:
    """The exception as text, cut in the middle when long: a server's log tail ends with the reason."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else f"{text[: limit // 4]} [...] {text[-limit * 3 // 4 :]}"


def fidelity(
    bench: VideoBench, folder: Path, steps: int, size: tuple[int, int, int], device: str = "cuda"
) -> dict[str, Any]:
    """FP16 against FP32 from the same seed and the same initial noise, in-process (diffusers).

    Both pipelines denoise the same FP32 noise (cast to their dtype) from the same conditioning (SVD:
    the image; CogVideoX: the prompt) to final latents; each decodes its own latents in its own
    precision, as the server would. Reported: the relative L2 error of the FP16 latents against the
    FP32 ones, the PSNR of the FP16 frames against the FP32 frames (pixels in [0, 1]), and each run's
    seconds and peak. With random weights this is numerical agreement between the two precisions, not
    a quality score.
    """
    import torch
    from diffusers import DiffusionPipeline

    width, height, frames = size
    out: dict[str, Any] = {"steps": steps, "frames": frames, "width": width, "height": height}
    latents, videos = {}, {}
    noise = None
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        if noise is None:
            noise = torch.randn(bench.latent_shape(pipe, size), generator=torch.Generator().manual_seed(SEED))
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            lat = bench.denoise(
                pipe, size, steps, noise.to(device, dtype), torch.Generator(device).manual_seed(SEED)
            )
            video = bench.decode(pipe, lat, frames)
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


def load_results(path: Path, run_header: dict[str, Any]) -> dict[str, Any]:
    """The results in `path` (if any) under this run's header, every old entry keeping its own.

    Records and fidelity entries written before records carried their run's header take the file's
    header, so none is lost when this run's replaces it.
    """
    old = json.loads(path.read_text()) if path.exists() else {}
    theirs = {k: old[k] for k in run_header if k in old}
    return {
        **run_header,
        "records": [r | {k: v for k, v in theirs.items() if k not in r} for r in old.get("records", [])],
        "fidelity": {
            name: f | {k: v for k, v in theirs.items() if k not in f}
            for name, f in old.get("fidelity", {}).items()
        },
    }


def _setting(record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two records measurements of the same thing (steps and size aside)."""
    keys = ("pipeline", "requested_precision", "budget_bytes")
    return (*(record.get(k) for k in keys), json.dumps(record.get("settings", {}), sort_keys=True))


def put_record(results: dict[str, Any], record: dict[str, Any]) -> None:
    """Add `record`, replacing the records of the same pipeline and setting."""
    results["records"] = [r for r in results["records"] if _setting(r) != _setting(record)] + [record]


def main() -> None:
    """Run every setting of the chosen pipeline and merge the records into --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), default="svd-xt")
    parser.add_argument("--out", type=Path, default=Path("bench/results/video.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (0: the pipeline's native)")
    parser.add_argument(
        "--fp32-steps", type=int, default=0, help="steps of FP32 runs (0: --steps); peak is per step"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--folder", type=Path, help="pipeline folder (default: the full-size one in --workdir)"
    )
    parser.add_argument("--size", default="", help="WIDTHxHEIGHTxFRAMES (default: the pipeline's native)")
    parser.add_argument("--fidelity", action="store_true", help="also compare FP16 with FP32 in-process")
    parser.add_argument("--fidelity-steps", type=int, default=0, help="steps of that comparison (0: --steps)")
    parser.add_argument(
        "--runs", default="", help="indexes of the pipeline's runs, e.g. 0,2, or none (default: all)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server setting for every chosen run, e.g. COMPILE=true; repeatable",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bench = PIPELINES[args.pipeline]
    folder = args.folder or args.workdir / bench.folder
    size: tuple[int, int, int] = tuple(int(v) for v in args.size.split("x")) if args.size else bench.size  # type: ignore[assignment]
    steps = args.steps or bench.steps
    if not (folder / "model_index.json").exists():
        bench.build(folder, args.device)
    run_header = header()
    results = load_results(args.out, run_header)
    chosen = bench.runs
    if args.runs:
        chosen = [] if args.runs == "none" else [bench.runs[int(i)] for i in args.runs.split(",")]
    extra = server_settings(args.setting)
    chosen = [(label, precision, budget, more | extra) for label, precision, budget, more in chosen]
    for run in chosen:
        run_steps = (args.fp32_steps or steps) if run[1] == "fp32" else steps
        record = run_one(bench, folder, run, run_steps, args.out.parent / "logs", args.device, size)
        put_record(results, record | run_header)
        write(args.out, results)
    if args.fidelity:
        measured = fidelity(bench, folder, args.fidelity_steps or steps, size, args.device)
        results["fidelity"][bench.name] = measured | run_header
        write(args.out, results)


if __name__ == "__main__":
    main()
