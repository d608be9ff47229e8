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
    glm = predict_footprint(
        glm_config(), 2, 2048, quantize_skip=QUANTIZE_SKIP, prefill_chunk=512, cuda_graphs=True
    )
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
    assert records["grpc", "decode"]["replay_ms_1_row"] is None  # on CPU: no CUDA graphs to replay
    assert records["in-process", "decode"]["replay_ms_1_row"] is None
    assert records["grpc", "decode"]["compiled_graphs"] is None
    assert records["in-process", "decode"]["compiled_graphs"] is None
    assert records["grpc", "concurrent"]["concurrency"] == 2
    assert records["grpc", "ttft"]["prompt_tokens"] == 64
    assert records["grpc", "ttft"]["ttft_ms_p50"] > 0
    assert _is_png(plot_llm(data, tmp_path / "llm.png"))
    # A second run into the same file (another precision) keeps the first run's records.
    args[args.index("--precisions") + 1] = "fp32"
    args += ["--in-process", ""]
    done = subprocess.run(
        [sys.executable, "-m", "bench.llm", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    both = json.loads(out.read_text())["records"]
    assert [r for r in both if r["precision"] == "fp16"] == data["records"]
    assert {(r["path"], r["phase"]) for r in both if r["precision"] == "fp32"} == {
        ("grpc", "decode"),
        ("grpc", "concurrent"),
        ("grpc", "ttft"),
    }


def test_the_replay_time_and_cache_counts_the_llm_server_logs_are_read_back(tmp_path: Path) -> None:
    """bench.llm reads llm_server.decode's log lines (the last ones, as the log is appended to)."""
    from bench.llm import logged_cache_counts, logged_replay_ms
    from llm_server.decode import CACHE_MESSAGE, REPLAY_MESSAGE

    log = tmp_path / "llm.log"
    assert logged_replay_ms(log) is None
    assert logged_cache_counts(log) is None
    lines = [REPLAY_MESSAGE % 4.1234, CACHE_MESSAGE % (0, 31, "/tmp/a"), REPLAY_MESSAGE % 3.7]
    lines.append(CACHE_MESSAGE % (29, 2, "/var/cache/inductor"))
    log.write_text("INFO start\n" + "".join(f"INFO {line}\n" for line in lines) + "INFO up\n")
    assert logged_replay_ms(log) == 3.7
    assert logged_cache_counts(log) == {"from_cache": 29, "compiled": 2}


# A scaled-down twin of CogVideoX-2b: its configs with these values replaced.
TINY_COGVIDEOX = {
    "transformer": {
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "text_embed_dim": 32,
        "time_embed_dim": 32,
    },
    "text_encoder": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 1},
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
}


def test_cogvideox_2b_configs_give_the_public_parameter_counts() -> None:
    """The builder's modules (meta device) have CogVideoX-2b's sizes, and the server counts the same."""
    from bench.fullsize import CONFIGS, cogvideox_2b_modules
    from video_server.families import COGVIDEOX, detect_family
    from video_server.footprint import component_sizes

    modules = cogvideox_2b_modules()
    assert all(p.is_meta for module in modules.values() for p in module.parameters())  # nothing allocated
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == {"transformer": 1_693_783_872, "text_encoder": 4_762_310_656, "vae": 215_583_907}
    folder = CONFIGS / "cogvideox-2b"
    assert detect_family(folder) is COGVIDEOX
    assert component_sizes(folder, COGVIDEOX).params == counts


def test_build_cogvideox_2b_writes_a_folder_the_video_server_loads(models_dir: Path, tmp_path: Path) -> None:
    """A scaled-down build: FP16 weights, T5's embedding saved once, loaded and warmed up by the engine."""
    from safetensors import safe_open

    from bench.fullsize import build_cogvideox_2b
    from video_server.engine import VideoEngine, VideoEngineConfig
    from video_server.families import COGVIDEOX, detect_family, resolve_limits
    from video_server.footprint import component_sizes
    from vram.plan import Policy

    tokenizer = models_dir / "t2v" / "tokenizer"
    folder = build_cogvideox_2b(tmp_path / "cogvideox", tokenizer, device="cpu", overrides=TINY_COGVIDEOX)
    assert detect_family(folder) is COGVIDEOX
    defaults, _ = resolve_limits(folder, COGVIDEOX)  # no sidecar: CogVideoX-2b's published defaults
    assert (defaults.width, defaults.height, defaults.num_frames, defaults.num_inference_steps) == (
        720,
        480,
        49,
        50,
    )
    for weights in folder.glob("*/*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            names = list(f.keys())
            dtypes = {f.get_slice(name).get_dtype() for name in names}
        assert dtypes == {"F16"}, weights
        assert "encoder.embed_tokens.weight" not in names  # tied to shared.weight: saved once
    engine = VideoEngine.load(VideoEngineConfig(folder, device="cpu", policy=Policy(precision="fp32")))
    assert (engine.modality, engine.plan.precision) == ("text-to-video", "fp32")
    assert engine.parameter_count == component_sizes(folder, COGVIDEOX).total_params
    pipe = engine.pipe
    assert pipe.tokenizer.model_max_length == pipe.transformer.config.max_text_seq_length == 226
    assert len(pipe.tokenizer) <= pipe.text_encoder.config.vocab_size == 32128


def test_video_results_keep_other_runs_records(tmp_path: Path) -> None:
    """A run replaces only the records of its pipeline and setting; older records keep their run's header."""
    from bench.video import load_results, put_record

    svd = {
        "pipeline": "svd-xt",
        "requested_precision": "fp16",
        "budget_bytes": 0,
        "settings": {},
        "seconds": 20,
    }
    cog = {"pipeline": "cogvideox-2b", "requested_precision": "fp16", "budget_bytes": 0, "settings": {}}
    cog_auto = cog | {"requested_precision": "auto", "budget_bytes": 6 * GiB}
    path = tmp_path / "video.json"
    old = {
        "gpu": "H200",
        "date": "2026-11-01",
        "command": "python -m bench.video",
        "records": [svd, cog, cog_auto],
    }
    path.write_text(json.dumps(old | {"fidelity": {"svd-xt": {"psnr_db": 50.0}}}))
    run = {"gpu": "H200", "date": "2026-12-01", "command": "python -m bench.video --pipeline cogvideox-2b"}
    results = load_results(path, run)
    put_record(results, cog | {"seconds": 60} | run)
    assert {k: results[k] for k in run} == run
    by_setting = {(r["pipeline"], r["requested_precision"]): r for r in results["records"]}
    assert len(results["records"]) == 3 == len(by_setting)
    assert by_setting["svd-xt", "fp16"] == svd | {
        "gpu": "H200",
        "date": "2026-11-01",
        "command": old["command"],
    }
    assert by_setting["cogvideox-2b", "auto"]["date"] == "2026-11-01"
    assert by_setting["cogvideox-2b", "fp16"] == cog | {"seconds": 60} | run
    assert results["fidelity"]["svd-xt"] == {"psnr_db": 50.0, "gpu": "H200", "date": "2026-11-01"} | {
        "command": old["command"]
    }
    assert load_results(tmp_path / "missing.json", run) == run | {"records": [], "fidelity": {}}


@pytest.mark.slow
def test_video_benchmark_dry_run_on_the_tiny_text_to_video_model(models_dir: Path, tmp_path: Path) -> None:
    """bench.video --pipeline cogvideox-2b end to end on CPU (about 30 s): a server per setting over gRPC."""
    out = tmp_path / "video.json"
    svd = {
        "pipeline": "svd-xt",
        "requested_precision": "fp16",
        "budget_bytes": 0,
        "settings": {},
        "seconds": 19.7,
    }
    out.write_text(json.dumps({"gpu": "NVIDIA H200", "date": "2026-11-28", "command": "x", "records": [svd]}))
    args = ["--pipeline", "cogvideox-2b", "--folder", str(models_dir / "t2v"), "--device", "cpu"]
    args += ["--size", "32x32x9", "--steps", "2", "--fp32-steps", "1", "--fidelity", "--fidelity-steps", "1"]
    args += ["--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.video", *args], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"gpu", "date", "command", "commit"} <= data.keys() and "--pipeline cogvideox-2b" in data[
        "command"
    ]
    records = {(r["pipeline"], r["requested_precision"], r["budget_bytes"]): r for r in data["records"]}
    assert records.pop(("svd-xt", "fp16", 0))["gpu"] == "NVIDIA H200"  # the other pipeline's record stays
    assert set(records) == {
        ("cogvideox-2b", "fp16", 0),
        ("cogvideox-2b", "fp32", 0),
        ("cogvideox-2b", "auto", 6 * GiB),
        ("cogvideox-2b", "auto", 8 * GiB),
        ("cogvideox-2b", "auto", 16 * GiB),
    }
    keys = {"pipeline", "precision", "offload", "budget_bytes", "frames", "width", "height", "steps"}
    keys |= {"seconds", "peak_bytes", "predicted_peak_bytes", "mp4_bytes", "guidance_scale", "command"}
    for (_, precision, _), record in records.items():
        assert "error" not in record, record
        assert keys <= record.keys()
        assert (record["width"], record["height"], record["frames"]) == (32, 32, 9)
        assert record["steps"] == (1 if precision == "fp32" else 2)
        assert record["mp4_bytes"] > 0 and record["seconds"] > 0
    assert records["cogvideox-2b", "fp32", 0]["precision"] == "fp32"
    fidelity = data["fidelity"]["cogvideox-2b"]
    assert fidelity["steps"] == 1 and fidelity["finite"]
    assert 0 < fidelity["latent_rel_error"] < 0.1 and fidelity["psnr_db"] > 20


@pytest.mark.slow
def test_video_benchmark_dry_run_on_the_tiny_svd_model(models_dir: Path, tmp_path: Path) -> None:
    """bench.video's SVD path on CPU (about 10 s): one setting over gRPC, then the in-process comparison."""
    out = tmp_path / "video.json"
    args = ["--folder", str(models_dir / "svd"), "--device", "cpu", "--size", "32x32x4", "--steps", "1"]
    args += ["--runs", "2", "--setting", "channels_last=true", "--fidelity", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.video", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    [record] = data["records"]
    assert "error" not in record, record
    assert (record["pipeline"], record["requested_precision"], record["budget_bytes"]) == (
        "svd-xt",
        "auto",
        6 * GiB,
    )
    assert record["settings"] == {"CHANNELS_LAST": "true"}  # --setting reaches the server and the record
    assert record["mp4_bytes"] > 0 and record["steps"] == 1
    assert set(data["fidelity"]) == {"svd-xt"} and data["fidelity"]["svd-xt"]["finite"]


def test_video_server_settings_from_the_command_line() -> None:
    from bench.video import server_settings

    assert server_settings(["compile=true", "SCRIPTREEL_VIDEO_DECODE_CHUNK_SIZE=25"]) == {
        "COMPILE": "true",
        "DECODE_CHUNK_SIZE": "25",
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        server_settings(["compile"])


def test_video_errors_keep_the_end_of_a_server_log() -> None:
    from bench.video import error_text

    short = RuntimeError("server exited")
    assert error_text(short) == "RuntimeError: server exited"
    long = RuntimeError(
        "video server exited with 2:\n" + "warning\n" * 1000 + "refuses to start: no plan fits"
    )
    text = error_text(long)
    assert len(text) <= 2010 and text.startswith("RuntimeError: video server exited")
    assert text.endswith("refuses to start: no plan fits")


def test_video_profile_dry_run_times_every_stage(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "video_profile.json"
    args = ["--folder", str(models_dir / "svd"), "--device", "cpu", "--steps", "3", "--size", "64x64x4"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.video_profile", *args, "--variants", "fp32", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(out.read_text())["records"]
    assert record["variant"] == "fp32" and record["precision"] == "fp32", record
    for run in ("first", "second"):
        stages = record[run]
        assert all(stages[k] > 0 for k in ("encode_and_first_step", "step_median", "decode", "mp4"))
        assert stages["seconds"] >= stages["encode_and_first_step"] + stages["decode"] + stages["mp4"]
        assert stages["projected_25_steps"] > stages["seconds"]  # 25 steps take longer than 3


def test_a_child_job_that_reports_nothing_gives_its_error() -> None:
    """bench.common.child_job: the child's exit code and stderr when it reports no record."""
    import os

    from bench.common import child_job

    failed = child_job("json.tool", "--no-such-flag", {}, dict(os.environ), timeout=60)
    assert set(failed) == {"error"} and failed["error"].startswith("exit code 2:")
    assert "json.tool: error" in failed["error"]  # its stderr


def test_gemv_sweep_candidates_leave_out_wasted_columns_and_spills() -> None:
    from bench.gemv_sweep import candidates

    found = candidates([1, 8], [512, 2048, 4096], [4, 16], in_features=1000)
    assert (1, 512, 4) in found and (1, 2048, 4) not in found  # 1,000 columns: a 1,024-wide pass suffices
    assert (8, 512, 4) in found  # 4,096 accumulators over 128 threads: 32 each
    wide = candidates([8], [4096], [4, 16], in_features=4096)
    assert wide == [(8, 4096, 16)]  # 8 x 4,096 over 128 threads would be 256 each
    assert candidates([1], [4096, 8192], [8], in_features=13696) == [(1, 4096, 8)]  # 16-bit: 4,096 at most
    assert candidates([1], [4096, 8192], [8], in_features=13696, itemsize=1) == [(1, 4096, 8), (1, 8192, 8)]


def test_gemv_sweep_apply_writes_its_table_into_the_module(tmp_path: Path) -> None:
    import importlib.util

    import torch

    from bench.gemv_sweep import apply, table
    from llm_server import gemv

    copy = tmp_path / "gemv.py"
    copy.write_text(Path(gemv.__file__).read_text())
    found = [
        {
            "shape": [4608, 4096],
            "itemsize": 2,
            "dtype": "float16",
            "products": 28,
            "best": {"config": [8, 1024, 4], "ms": 0.29},
        },
        {
            "shape": [64, 32],
            "itemsize": 1,
            "dtype": "int8",
            "products": 1,
            "best": {"config": [2, 32, 2], "ms": 0.01},
        },
    ]
    apply(table(found), copy)

    spec = importlib.util.spec_from_file_location("gemv_copy", copy)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept = {key: config for key, config in gemv.MEASURED.items() if key != (4608, 4096, "float16")}
    assert {**kept, (4608, 4096, "float16"): (8, 1024, 4), (64, 32, "int8"): (2, 32, 2)} == module.MEASURED
    assert module.launch_config(64, 32, torch.int8) == (2, 32, 2)
    assert module.launch_config(64, 32, torch.float8_e4m3fn) == (1, 32, 1)  # FP8 of that shape: the rule
    assert module.launch_config(64, 32) == (1, 32, 1)  # 16-bit weights of that shape: the rule
    assert module.launch_config(4608, 4096, torch.bfloat16) == (8, 1024, 4)  # BF16: FP16's entry
    assert '(4608, 4096, "float16"): (8, 1024, 4),  # 0.29 ms for 28' in copy.read_text()
    other = tmp_path / "other.py"
    other.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="no MEASURED table"):
        apply(table(found), other)
