"""The benchmarks' pure parts (the card split, the charts) and a dry run of bench.llm on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.compat import Needs, split_budget
from bench.plots import plot_all, plot_compat, plot_llm, plot_precision

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30
MiB = 2**20
PNG = b"\x89PNG\r\n\x1a\n"
NEEDS = Needs()


@pytest.mark.parametrize("card_gb", [4, 8, 12, 16, 24, 80])
def test_split_budget_fills_the_card(card_gb: int) -> None:
    llm, video = split_budget(card_gb * GiB)
    usable = card_gb * GiB
    assert llm > 0 and video > 0
    assert llm % MiB == 0 and video % MiB == 0
    assert usable - MiB < llm + video <= usable


def test_split_budget_gives_the_llm_half_precision_when_the_video_keeps_its_floor() -> None:
    assert split_budget(80 * GiB) == (NEEDS.llm_half, 80 * GiB - NEEDS.llm_half)
    llm, video = split_budget(24 * GiB)
    assert llm == NEEDS.llm_half and video >= NEEDS.video_floor


def test_split_budget_falls_back_to_the_8bit_llm_then_to_shares() -> None:
    for card in (16, 12):
        llm, video = split_budget(card * GiB)
        assert llm == NEEDS.llm_8bit and video >= NEEDS.video_floor
    # 8 GiB cannot hold both smallest plans: shares in proportion to them, both below
    for card in (8,):
        llm, video = split_budget(card * GiB)
        assert llm < NEEDS.llm_8bit and video < NEEDS.video_floor
        assert llm / video == pytest.approx(NEEDS.llm_8bit / NEEDS.video_floor, rel=1e-3)


def test_split_budget_is_monotonic_and_never_negative() -> None:
    splits = [split_budget(gb * GiB // 2) for gb in range(0, 200)]
    assert all(llm >= 0 and video >= 0 for llm, video in splits)
    totals = [llm + video for llm, video in splits]
    assert totals == sorted(totals)
    assert split_budget(0) == (0, 0)


def test_needs_match_the_plans_of_the_reference_models() -> None:
    """The budgets split_budget hands out admit the plans they are meant for, as the servers predict them."""
    from bench.fullsize import CONFIGS, glm_config
    from llm_server.engine import QUANTIZE_SKIP
    from llm_server.footprint import predict_footprint
    from vram.plan import Hardware, Policy, predict_peak, resolve_plan

    h200 = Hardware("cuda:0", 141 * GiB, (9, 0), bf16=True)
    glm = predict_footprint(glm_config(), 2, 2048, quantize_skip=QUANTIZE_SKIP, prefill_chunk=512)
    assert resolve_plan(glm, h200, Policy(budget_bytes=NEEDS.llm_half)).precision == "fp16"
    assert resolve_plan(glm, h200, Policy(budget_bytes=NEEDS.llm_8bit)).precision == "int8"
    assert predict_peak(glm, h200, "int8") <= NEEDS.llm_8bit < predict_peak(glm, h200, "fp8")

    from video_server.families import detect_family, resolve_limits
    from video_server.footprint import ActivationModel, component_sizes
    from video_server.footprint import predict_footprint as predict_video
    from video_server.planning import resolve_knobs, video_policy

    folder = CONFIGS / "svd-xt"
    family = detect_family(folder)
    defaults, _ = resolve_limits(folder, family)
    relaxed, tight = resolve_knobs(_Knobs(), family)
    video = predict_video(
        component_sizes(folder, family),
        ActivationModel(folder, family, vae_fp32=False),
        family,
        defaults.width,
        defaults.height,
        defaults.num_frames,
        relaxed,
        tight,
    )
    policy = video_policy(Policy(budget_bytes=NEEDS.video_floor), family, h200, None)
    assert resolve_plan(video, h200, policy).offload != "none"  # the floor is an offloaded plan
    for card in (12, 16, 24, 80):  # both servers find a plan on every card but the smallest
        llm_budget, video_budget = split_budget(card * GiB)
        resolve_plan(glm, h200, Policy(budget_bytes=llm_budget))
        resolve_plan(video, h200, video_policy(Policy(budget_bytes=video_budget), family, h200, None))


class _Knobs:
    decode_chunk_size = 0
    forward_chunking = None
    vae_tiling = None
    split_guidance = None


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_precision_plot_from_the_committed_results(tmp_path: Path) -> None:
    data = json.loads((REPO / "bench/results/precision.json").read_text())
    assert _is_png(plot_precision(data, tmp_path / "precision.png"))


def test_plot_all_skips_missing_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "precision.json").write_text((REPO / "bench/results/precision.json").read_text())
    written = plot_all(results, tmp_path / "img")
    assert [p.name for p in written] == ["precision_memory.png"]
    out = capsys.readouterr().out
    assert "skipped llm_throughput.png" in out and "skipped compat_matrix.png" in out


def test_compat_plot_draws_completed_failed_and_refused_cards(tmp_path: Path) -> None:
    records = []
    for card, outcome in ((8, "refused"), (16, "failed"), (24, "completed")):
        llm, video = split_budget(card * GiB)
        record: dict[str, Any] = {
            "card_gb": card,
            "llm_budget_bytes": llm,
            "video_budget_bytes": video,
            "completed": False,
        }
        if outcome == "refused":
            record["refusals"] = {"llm": "llm server refuses to start: no plan fits the budget of 3.9 GiB"}
        else:
            record |= {"llm_plan": "fp8", "video_plan": "fp16 + model offload", "llm_peak_bytes": 7 * GiB}
            record |= {"video_peak_bytes": 6 * GiB, "seconds": 120.0, "error": "RpcError: out of GPU memory"}
            record["completed"] = outcome == "completed"
        records.append(record)
    data = {"gpu": "test", "date": "2026-01-01", "records": records}
    assert _is_png(plot_compat(data, tmp_path / "compat.png"))


@pytest.mark.slow
def test_llm_benchmark_dry_run_on_the_tiny_model(models_dir: Path, tmp_path: Path) -> None:
    """bench.llm end to end on CPU (about 10 s): well-formed records for both paths, then its chart."""
    out = tmp_path / "llm.json"
    args = ["--folder", str(models_dir / "llm"), "--device", "cpu", "--precisions", "fp16", "--out", str(out)]
    args += ["--new-tokens", "16", "--concurrency", "2", "--prompt-tokens", "64", "--ttft-runs", "2"]
    args += ["--decode-runs", "1", "--logs", str(tmp_path / "logs"), "--workdir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.llm", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"gpu", "date", "command"} <= data.keys()
    records = {(r["path"], r["phase"]): r for r in data["records"]}
    assert set(records) == {
        ("grpc", "decode"),
        ("grpc", "concurrent"),
        ("grpc", "ttft"),
        ("in-process", "decode"),
    }
    keys = {"precision", "concurrency", "prompt_tokens", "new_tokens", "tokens_per_s", "ttft_ms_p50"}
    keys |= {"itl_ms_p50", "peak_bytes", "path"}
    for record in records.values():
        assert "error" not in record, record
        assert keys <= record.keys()
    assert records["grpc", "decode"]["tokens_per_s"] > 0
    assert records["grpc", "decode"]["grpc_over_in_process"] > 0
    assert records["grpc", "concurrent"]["concurrency"] == 2
    assert records["grpc", "ttft"]["prompt_tokens"] == 64
    assert records["grpc", "ttft"]["ttft_ms_p50"] > 0
    assert _is_png(plot_llm(data, tmp_path / "llm.png"))
