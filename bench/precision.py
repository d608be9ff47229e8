"""Precision plans on the full-size architectures: weights, predicted and measured peaks, fidelity.

    python -m bench.precision --out bench/results/precision.json          # on a GPU
    python -m bench.precision --tiny --device cpu --out /tmp/p.json       # a dry run on the tiny models

For the 6.24e9-parameter GLM (ChatGLM3-6B dimensions) and the SVD-XT pipeline (25 frames, 576x1024),
each precision is loaded by the servers' own engines (LlmEngine.load, VideoEngine.load) from a folder
of random weights written once with save_pretrained. Per record: parameters, weights bytes as stored,
the plan's predicted peak, and the measured peak (allocator reserved peak plus the CUDA context and
library handles, i.e. what the process holds on the card). GLM records add next-token agreement and
relative logit error against FP32 on a fixed batch of prompts, and a batch-1 decode rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.common import ProcessMemory, header, write
from bench.fullsize import build_glm, build_svd_xt
from llm_server.engine import GenerationRequest, LlmEngine, LlmEngineConfig
from video_server.engine import VideoEngine, VideoEngineConfig
from video_server.params import Result, VideoParams
from vram.plan import Policy

log = logging.getLogger("bench.precision")
GLM_VARIANTS = [
    ("fp32", ()),
    ("fp16", ()),
    ("bf16", ()),
    ("fp16", ("lm_head",)),
    ("int8", ()),
    ("fp8", ()),
    ("int4", ()),
]
SVD_VARIANTS = ["fp32", "fp16", "bf16", "int8", "fp8"]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def glm_records(folder: Path, device: str, mem: ProcessMemory, batch: int, seq: int) -> list[dict[str, Any]]:
    """One record per GLM variant, FP32 first (the fidelity reference)."""
    records: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    simulated: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(3, 1000, (batch, seq), generator=gen)
    for precision, keep in GLM_VARIANTS:
        name = precision + ("+keep_fp32=" + ",".join(keep) if keep else "")
        record: dict[str, Any] = {"model": "glm-6b (ChatGLM3-6B dims)", "precision": name}
        _free()
        mem.reset_peak()
        try:
            start = time.perf_counter()
            engine = LlmEngine.load(
                LlmEngineConfig(
                    folder,
                    device=device,
                    max_batch_size=batch,
                    max_context_tokens=seq + 64,
                    policy=Policy(precision=precision, keep_fp32=keep, allow_fallback=False),
                )
            )
            record["load_seconds"] = round(time.perf_counter() - start, 2)
            with torch.no_grad():
                logits = engine.model(input_ids=prompts.to(engine.model.device)).logits.float().cpu()
            record.update(mem.peak())
            record.update(
                params=engine.parameter_count,
                weights_bytes=engine.monitor.weights_bytes,
                predicted_peak_bytes=engine.plan.predicted_peak_bytes,
                plan=engine.plan.reason,
            )
            record["bytes_per_param"] = round(record["weights_bytes"] / record["params"], 4)
            if reference is None:
                reference = logits
                simulated = _simulated_8bit(engine.model, prompts, reference)
            record.update(_agreement(logits, reference))
            record["decode_tokens_per_s_batch1"] = _decode_rate(engine)
            engine.close()
            del engine, logits
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            log.error("GLM %s failed:\n%s", name, traceback.format_exc())
        if record.get("measured_peak_bytes"):
            record["predicted_over_measured"] = round(
                record["predicted_peak_bytes"] / record["measured_peak_bytes"], 3
            )
        records.append(record)
        log.info("%s", record)
    for name, logits in simulated.items():
        assert reference is not None  # simulated is filled from the FP32 reference
        records.append(
            {
                "model": "glm-6b (ChatGLM3-6B dims)",
                "precision": name,
                "simulated": True,
                **_agreement(logits, reference),
            }
        )
        log.info("%s", records[-1])
    return records


def _agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {
        "top1_agreement_vs_fp32": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "rel_logit_error_vs_fp32": float((logits - reference).norm() / reference.norm()),
    }


@torch.no_grad()
def _simulated_8bit(model: torch.nn.Module, prompts: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Logits of the FP32 model with its Linear weights rounded as int8/fp8 per-channel storage would.

    A reference free of any library: if torchao's records agree with these, the loss of agreement is
    the 8-bit rounding itself on this random-weight network, not a broken implementation.
    """
    linears: list[torch.nn.Linear] = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    originals = [m.weight.detach().clone() for m in linears]
    out: dict[str, Any] = {}
    for name, rounding in (
        ("int8 (simulated per-channel rounding, fp32 compute)", _round_int8),
        ("fp8 (simulated per-channel e4m3 rounding, fp32 compute)", _round_fp8),
    ):
        for module, weight in zip(linears, originals, strict=True):
            module.weight.copy_(rounding(weight))
        out[name] = model(input_ids=prompts.to(next(model.parameters()).device)).logits.float().cpu()
    for module, weight in zip(linears, originals, strict=True):
        module.weight.copy_(weight)
    return out


def _round_int8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (w / scale).round().clamp(-128, 127) * scale


def _round_fp8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
    return (w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale


def _decode_rate(engine: LlmEngine, new_tokens: int = 64) -> float:
    prepared = engine.validate(
        GenerationRequest(prompt="Once upon a time", max_new_tokens=new_tokens, temperature=0.0, stop=())
    )
    start, tokens = time.perf_counter(), 0
    for event in engine.generate(prepared, lambda: False):
        tokens = getattr(event, "completion_tokens", tokens)
    return round(tokens / (time.perf_counter() - start), 1)


def svd_records(
    folder: Path, device: str, mem: ProcessMemory, size: tuple[int, int, int], steps: int, decode_chunk: int
) -> list[dict[str, Any]]:
    """One record per SVD-XT variant, the whole pipeline (encoder, UNet with CFG, VAE) at `size`."""
    width, height, frames = size
    records = []
    for precision in SVD_VARIANTS:
        record: dict[str, Any] = {
            "model": "svd-xt",
            "precision": precision,
            "frames": frames,
            "width": width,
            "height": height,
            "steps": steps,
            "decode_chunk_size": decode_chunk,
        }
        _free()
        mem.reset_peak()
        try:
            start = time.perf_counter()
            engine = VideoEngine.load(
                VideoEngineConfig(
                    folder,
                    device=device,
                    decode_chunk_size=decode_chunk,
                    forward_chunking=False,
                    policy=Policy(
                        precision=precision, offload="none", allow_fallback=False, supports_offload=True
                    ),
                )
            )
            record["load_seconds"] = round(time.perf_counter() - start, 2)
            params = engine.validate(
                VideoParams(
                    image=_image(width, height),
                    width=width,
                    height=height,
                    num_frames=frames,
                    num_inference_steps=steps,
                    seed=1,
                )
            )
            start = time.perf_counter()
            result = next(e for e in engine.generate(params, lambda: False) if isinstance(e, Result))
            record["seconds"] = round(time.perf_counter() - start, 2)
            record.update(mem.peak())
            record.update(
                params=engine.parameter_count,
                weights_bytes=engine.monitor.weights_bytes,
                predicted_peak_bytes=engine.plan.predicted_peak_bytes,
                plan=engine.plan.reason,
                keep_fp32=list(engine.plan.keep_fp32),
                mp4_bytes=result.size_bytes,
            )
            record["predicted_over_measured"] = (
                round(record["predicted_peak_bytes"] / record["measured_peak_bytes"], 3)
                if record["measured_peak_bytes"]
                else None
            )
            del engine
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            log.error("SVD %s failed:\n%s", precision, traceback.format_exc())
        records.append(record)
        log.info("%s", record)
    return records


def _image(width: int, height: int) -> bytes:
    from media.keyframe import render_keyframe

    return render_keyframe("a mountain bike on a forest trail", width, height, seed=3)


def repredict(path: Path) -> None:
    """Add to each full-size record what the plan code predicts today for the same settings.

    `predicted_peak_bytes` stays what the server predicted when it was measured; `predicted_now_bytes`
    and `predicted_now_over_measured` are the current prediction (pure functions, no device) for the
    same model, precision, keep_fp32 and limits (GLM: batch 8, context 128; SVD-XT: 25 frames at
    1024x576, no offload), against the same measurement.
    """
    from bench.fullsize import CONFIGS, glm_config
    from llm_server.engine import QUANTIZE_SKIP
    from llm_server.footprint import predict_footprint
    from video_server.families import detect_family
    from video_server.footprint import ActivationModel, MemoryKnobs, component_sizes
    from video_server.footprint import predict_footprint as predict_video
    from vram.plan import Hardware, predict_peak

    data = json.loads(path.read_text())
    h200 = Hardware("cuda:0", 141 * 2**30, (9, 0), bf16=True)
    glm = predict_footprint(glm_config(), 8, 64 + 64, quantize_skip=QUANTIZE_SKIP)
    folder = CONFIGS / "svd-xt"
    family = detect_family(folder)
    sizes = component_sizes(folder, family)
    for record in data["records"]:
        if not record.get("measured_peak_bytes"):
            continue  # not run, or simulated without a device
        precision, _, kept = record["precision"].partition("+keep_fp32=")
        keep = tuple(record.get("keep_fp32") or ([kept] if kept else []))
        if record["model"].startswith("glm"):
            footprint = glm
        else:
            knobs = MemoryKnobs(decode_chunk_size=record.get("decode_chunk_size") or 8)
            activations = ActivationModel(folder, family, vae_fp32=False)  # the servers' default
            footprint = predict_video(sizes, activations, family, 1024, 576, 25, knobs, knobs)
        now = predict_peak(footprint, h200, precision, "none", keep)
        record["predicted_now_bytes"] = now
        record["predicted_now_over_measured"] = round(now / record["measured_peak_bytes"], 3)
    data["repredicted_by"] = "python -m bench.precision --repredict"
    write(path, data)


def main() -> None:
    """Run the benchmark and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/precision.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="glm,svd")
    parser.add_argument("--tiny", action="store_true", help="dry run on models/ (tiny models), CPU")
    parser.add_argument("--svd-steps", type=int, default=2, help="peak memory does not depend on steps")
    parser.add_argument("--decode-chunk", type=int, default=0, help="0: the plan's choice")
    parser.add_argument(
        "--repredict",
        action="store_true",
        help="no GPU: add the current code's predictions to the records of --out (predicted_now)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.repredict:
        repredict(args.out)
        return
    mem = ProcessMemory()
    result: dict[str, Any] = {**header(), "records": []}
    tiny = Path("models")
    if "glm" in args.only:
        folder = tiny / "llm" if args.tiny else args.workdir / "glm"
        if not args.tiny and not (folder / "config.json").exists():
            start = time.perf_counter()
            build_glm(folder, tokenizer_dir=tiny / "llm", device=args.device)
            log.info("built %s in %.0fs", folder, time.perf_counter() - start)
        result["records"] += glm_records(folder, args.device, mem, batch=8, seq=64)
        write(args.out, result)
    if "svd" in args.only:
        folder = tiny / "svd" if args.tiny else args.workdir / "svd"
        if not args.tiny and not (folder / "model_index.json").exists():
            start = time.perf_counter()
            build_svd_xt(folder, device=args.device)
            log.info("built %s in %.0fs", folder, time.perf_counter() - start)
        size = (64, 48, 6) if args.tiny else (1024, 576, 25)
        result["records"] += svd_records(folder, args.device, mem, size, args.svd_steps, args.decode_chunk)
        write(args.out, result)
    write(args.out, result)


if __name__ == "__main__":
    main()
