"""Which card runs what (issue 8): the LLM and video servers on one GPU under per-process budgets.

    python -m bench.compat --out bench/results/compat.json     # on a GPU (builds the models if missing)
    python -m bench.compat --tiny --out /tmp/compat.json        # a CPU dry run on models/llm and models/svd

For each card size (`--cards`, default 8,12,16,24,80 GB, taken as GiB), the card is emulated on the
large GPU by the servers' own `vram_budget` (each process's allocator is capped to it): `split_budget`
divides the card between the LLM and the video server, the whole stack (LocalStack: LLM, video,
gateway on loopback) starts with `precision=auto` on both, and one CreateVideo runs through the
gateway: a 3-scene script, then one SVD-XT clip per scene (25 frames at 1024x576, `--steps` 25).
Per card it records the plans auto chose, each server's peak (the larger of its load peak, scraped from
/metrics, and its request peaks), the device's peak as NVML saw it (both processes, contexts
included), the time of each stage, and whether the video completed. A server that refuses to start
is recorded with its message (completed=false). Each card is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.common import header, write
from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from vram.hardware import detect
from vram.monitor import nvml_handle

log = logging.getLogger("bench.compat")
GiB = 2**30
MiB = 2**20
CARDS_GB = (8, 12, 16, 24, 80)
BRIEF = "a 20-second teaser for a mountain bike"


@dataclass(frozen=True)
class Needs:
    """Budgets the reference deployment's plans need (GLM-6B and SVD-XT, see split_budget).

    A budget bounds a whole process, its CUDA context included (vram.monitor), as the plans' predicted
    peaks do; tests/unit/test_bench_dry_run.py checks these against the servers' own predictions.

    Attributes:
        llm_half: The LLM in FP16/BF16 at this benchmark's limits (batch 2, context 2048): the plan
            predicts 12.60 GiB.
        llm_8bit: The LLM with 8-bit Linear weights (embeddings and lm_head in FP16): INT8 is
            predicted at 7.91 GiB with its CUDA graphs' pool (FP8 at 8.85: torchao's FP8
            weight-only matmul holds a larger dequantized copy; measured in bench/results/compat.json).
        video_floor: SVD-XT's smallest plan for 25 frames at 1024x576 (FP8 with group offload, split
            guidance, decode chunk 2): predicted 3.97 GiB (its decode phase measured 2.74 GiB
            allocated plus the context on the H200).
    """

    llm_half: int = 51 * GiB // 4
    llm_8bit: int = 8 * GiB
    video_floor: int = 4 * GiB


def split_budget(card_bytes: int, *, needs: Needs = Needs()) -> tuple[int, int]:
    """Divide one card between the LLM server and the video server: (llm_bytes, video_bytes).

    Each budget bounds one process, CUDA context included, so the two add up to the card. The LLM
    cannot offload, while the video pipeline can (offload and chunking cost speed, not quality), so
    the LLM is sized first, in the most faithful precision that still leaves the video its floor:

    1. the LLM gets `needs.llm_half` if `card - llm_half >= video_floor`;
    2. else `needs.llm_8bit` if `card - llm_8bit >= video_floor`;
    3. else the card cannot hold both smallest plans: it is split in proportion to
       (llm_8bit, video_floor), and each server either fits its share or refuses at start with the
       plans it would need.

    The video server gets the rest of the card in every case, and picks its own plan with `auto`.
    Budgets are whole MiB. Pure: no device is touched.
    """
    usable = max(0, card_bytes)
    for llm in (needs.llm_half, needs.llm_8bit):
        if usable - llm >= needs.video_floor:
            break
    else:
        llm = usable * needs.llm_8bit // (needs.llm_8bit + needs.video_floor)
    llm -= llm % MiB
    video = usable - llm
    return llm, video - video % MiB


class DevicePeak:
    """The device's used memory (NVML, every process) above a baseline, sampled in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = 0
        self._interval = interval
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            self._handle = nvml_handle(0)
            self._nvml = pynvml
        except Exception:
            return
        self.baseline = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._used() - self.baseline)

    def stop(self) -> int | None:
        """Stop sampling; the peak in bytes, or None without NVML."""
        if self._handle is None:
            return None
        self._stop.set()
        self._thread.join()
        return self.peak


def plan_label(plan: Any) -> str:
    """A PrecisionPlan message in a few words: "fp8", "fp16 + model offload, decode chunk 2"."""
    label = plan.precision
    if plan.offload and plan.offload != "none":
        label += f" + {plan.offload} offload"
    knobs = [f"decode chunk {plan.decode_chunk_size}"] if plan.decode_chunk_size else []
    knobs += ["forward chunking"] * plan.forward_chunking + ["VAE tiling"] * plan.vae_tiling
    knobs += ["split guidance"] * plan.split_guidance
    return ", ".join([label, *knobs])


def load_peak(stack: LocalStack, name: str) -> int:
    """scriptreel_load_peak_bytes from the server's /metrics (0 when absent)."""
    url = f"http://127.0.0.1:{stack.ports[name][1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    values = [float(m) for m in re.findall(r"^scriptreel_load_peak_bytes\{[^}]*\} (\S+)$", text, re.M)]
    return int(max(values, default=0))


def refusal(log_path: Path) -> str | None:
    """Why a server did not start, from its log: the refusal line, or the end of a load failure."""
    if not log_path.exists():
        return None
    lines = log_path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if "refuses to start" in line:
            return line.split(": ", 1)[-1]
        if "could not load its model" in line:
            return "\n".join([line, *lines[i + 1 :]][-6:])
    return None


def run_card(card_gb: int, stack: LocalStack, video: gw.VideoParameters, timeout: float) -> dict[str, Any]:
    """Start the stack, make one video through the gateway, stop the stack; the card's record."""
    llm_budget = int(stack.extra_env["llm"]["SCRIPTREEL_LLM_VRAM_BUDGET"])
    video_budget = int(stack.extra_env["video"]["SCRIPTREEL_VIDEO_VRAM_BUDGET"])
    record: dict[str, Any] = {
        "card_gb": card_gb,
        "card_bytes": card_gb * GiB,
        "llm_budget_bytes": llm_budget,
        "video_budget_bytes": video_budget,
        "llm_plan": None,
        "video_plan": None,
        "llm_peak_bytes": None,
        "video_peak_bytes": None,
        "completed": False,
        "seconds": None,
        "error": None,
    }
    device = DevicePeak()
    began = time.monotonic()
    started = False
    try:
        stack.start(timeout=min(timeout, 600))
        started = True
        record["startup_seconds"] = round(time.monotonic() - began, 1)
        with grpc.insecure_channel(stack.gateway_target) as channel:
            stub = gw_grpc.GatewayServiceStub(channel)
            record.update(_plans(stub))
            try:
                record.update(_make_video(stub, video, timeout - (time.monotonic() - began)))
                record["completed"] = True
            finally:  # the peaks also tell where a failed request ended
                record.update(_peaks(stack, stub, record))
    except Exception as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)  # type: ignore[attr-defined]
        record["error"] = f"{type(exc).__name__}: {detail}"[:3000]
        log.error("card %s GB: %s", card_gb, traceback.format_exc())
    finally:
        codes = stack.stop()
        record["device_peak_bytes"] = device.stop()
    refusals = {n: why for n in ("llm", "video") if (why := refusal(stack.log_dir / f"{n}.log"))}
    if refusals and not started:
        record["refusals"] = refusals
        record["error"] = "; ".join(refusals.values())
        record["exit_codes"] = codes
    log.info("%s", record)
    return record


def _make_video(
    stub: gw_grpc.GatewayServiceStub, video: gw.VideoParameters, timeout: float
) -> dict[str, Any]:
    """One CreateVideo of BRIEF in 3 scenes; its wall time and the summary's figures."""
    request = gw.CreateVideoRequest(brief=BRIEF, num_scenes=3, video=video)
    start = time.perf_counter()
    summary, size = None, 0
    for event in stub.CreateVideo(request, timeout=max(timeout, 10)):
        kind = event.WhichOneof("event")
        if kind == "chunk":
            size += len(event.chunk.data)
        elif kind == "summary":
            summary = event.summary
    if summary is None:
        raise RuntimeError("CreateVideo ended without a summary")
    out: dict[str, Any] = {
        "seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": {t.stage: round(t.seconds, 2) for t in summary.timings},
        "script_fallback_used": summary.script_fallback_used,
        "mp4_bytes": size,
        "frames": summary.num_frames,
    }
    for upstream in summary.upstreams:
        out[f"{upstream.server}_request_peak_bytes"] = upstream.memory.peak_allocated_bytes
    return out


def _peaks(stack: LocalStack, stub: gw_grpc.GatewayServiceStub, record: dict[str, Any]) -> dict[str, Any]:
    """Each server's peak: the largest of its load peak, its request peaks and its status peak."""
    after = _plans(stub)
    out: dict[str, Any] = {}
    for name in ("llm", "video"):
        out[f"{name}_load_peak_bytes"] = load_peak(stack, name)
        out[f"{name}_status_peak_bytes"] = after[f"{name}_status_peak_bytes"]
        peaks = [record.get(f"{name}_request_peak_bytes") or 0, out[f"{name}_status_peak_bytes"]]
        out[f"{name}_peak_bytes"] = max(*peaks, out[f"{name}_load_peak_bytes"])
    out["total_peak_bytes"] = out["llm_peak_bytes"] + out["video_peak_bytes"]
    return out


def _plans(stub: gw_grpc.GatewayServiceStub) -> dict[str, Any]:
    status = stub.GetStatus(gw.GetStatusRequest(), timeout=30)
    out: dict[str, Any] = {}
    for upstream in status.upstreams:
        plan = upstream.info.plan
        out[f"{upstream.server}_plan"] = plan_label(plan)
        out[f"{upstream.server}_plan_reason"] = plan.reason
        out[f"{upstream.server}_predicted_bytes"] = plan.predicted_peak_bytes
        out[f"{upstream.server}_status_peak_bytes"] = upstream.info.memory.peak_allocated_bytes
        out[f"{upstream.server}_reported_budget_bytes"] = upstream.info.memory.budget_bytes
    return out


def main() -> None:
    """Run every card and write the JSON after each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/compat.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--logs", type=Path, help="server logs (default: logs/ beside --out)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on models/ at their default size")
    parser.add_argument("--cards", default=",".join(map(str, CARDS_GB)), help="card sizes in GB (GiB)")
    parser.add_argument(
        "--steps", type=int, help="denoising steps per scene (25; --tiny: the model's default)"
    )
    parser.add_argument("--size", default="1024x576x25", help="WIDTHxHEIGHTxFRAMES of each clip")
    parser.add_argument("--llm-batch", type=int, default=2, help="LLM max_batch_size")
    parser.add_argument("--llm-context", type=int, default=2048, help="LLM max_context_tokens")
    parser.add_argument("--script-tokens", type=int, default=512, help="the gateway's script token limit")
    parser.add_argument("--card-timeout", type=float, default=600.0, help="seconds per card, start included")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="no card starts after this")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="only merge these results (cards run on several GPUs)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        write(args.out, merge(args.merge))
        return
    began = time.monotonic()
    llm_folder, video_folder = _folders(args)
    width, height, frames = (0, 0, 0) if args.tiny else (int(v) for v in args.size.split("x"))
    steps = args.steps if args.steps is not None else (0 if args.tiny else 25)
    video = gw.VideoParameters(
        width=width, height=height, num_frames=frames, num_inference_steps=steps, seed=7
    )
    result: dict[str, Any] = {**header(), "llm_folder": str(llm_folder), "video_folder": str(video_folder)}
    result["split"] = {"rule": "bench.compat.split_budget", **asdict(Needs())}
    result["records"] = []
    logs = args.logs or args.out.parent / "logs"
    host = detect("cpu").total_bytes
    if args.tiny:
        result["note"] = "CPU dry run: budgets capped at half the host's memory each; no device figures"
    for card in (int(c) for c in args.cards.split(",") if c):
        if time.monotonic() - began > args.max_seconds:
            result["records"].append(
                {"card_gb": card, "completed": False, "error": "skipped: --max-seconds spent"}
            )
            continue
        budgets = split_budget(card * GiB)
        if args.tiny:  # a CPU's "device memory" is the host's: budgets above it would be refused
            budgets = (min(budgets[0], host // 2), min(budgets[1], host // 2))
        stack = card_stack(args, llm_folder, video_folder, budgets, logs / f"compat-{card}gb")
        result["records"].append(run_card(card, stack, video, args.card_timeout))
        write(args.out, result)
    result["seconds"] = round(time.monotonic() - began, 1)
    write(args.out, result)


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from runs of disjoint cards (one per GPU, in parallel): their records by card size."""
    parts = [json.loads(path.read_text()) for path in paths]
    merged = {k: v for k, v in parts[0].items() if k not in ("records", "seconds")}
    merged["command"] = " ; ".join(part["command"] for part in parts)
    merged["records"] = sorted((r for part in parts for r in part["records"]), key=lambda r: r["card_gb"])
    return merged


def card_stack(
    args: argparse.Namespace, llm: Path, video: Path, budgets: tuple[int, int], logs: Path
) -> LocalStack:
    """The stack of one card: both model servers with precision=auto under their budgets."""
    common = {"DEVICE": "cpu" if args.tiny else args.device, "PRECISION": "auto", "GRACE_SECONDS": "10"}
    llm_env = {**common, "VRAM_BUDGET": str(budgets[0]), "MAX_BATCH_SIZE": str(args.llm_batch)}
    llm_env["MAX_CONTEXT_TOKENS"] = str(args.llm_context)
    video_env = {**common, "VRAM_BUDGET": str(budgets[1])}
    gateway_env = {
        "SCRIPT_MAX_NEW_TOKENS": str(args.script_tokens),
        "SCENE_TIMEOUT_SECONDS": str(args.card_timeout),
    }
    stack = LocalStack.on_free_ports(
        llm,
        video,
        logs,
        extra_env={
            "llm": {f"SCRIPTREEL_LLM_{k}": v for k, v in llm_env.items()},
            "video": {f"SCRIPTREEL_VIDEO_{k}": v for k, v in video_env.items()},
            "gateway": {f"SCRIPTREEL_GATEWAY_{k}": v for k, v in gateway_env.items()},
        },
    )
    for path in logs.glob("*.log"):  # ServerProcess appends: each card starts afresh
        path.unlink()
    return stack


def _folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folders: the tiny ones, or the full-size GLM and SVD-XT (built if missing)."""
    if args.tiny:
        return Path("models/llm"), Path("models/svd")
    import torch

    from bench.fullsize import build_glm, build_svd_xt

    llm, video = args.workdir / "glm", args.workdir / "svd"
    if not (llm / "config.json").exists():
        build_glm(llm, tokenizer_dir=Path("models/llm"), device=args.device)
    if not (video / "model_index.json").exists():
        build_svd_xt(video, device=args.device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return llm, video


if __name__ == "__main__":
    main()
