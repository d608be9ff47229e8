"""Soak: 300 WriteScript (one LLM Generate each) and 30 CreateVideo calls through the gateway, 8 at a time.

Every call must be answered OK. After a warm-up of the same shape, each server's resident memory
must stay within 10% and its threads and open file descriptors must not grow. The figures go to
soak.json in the test's temporary folder and to stdout; docs/RELIABILITY.md quotes a real run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from gateway.pipeline import JOIN_WORKERS
from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from tests.reliability.probes import (
    ProcessFigures,
    error_counts,
    metric,
    pid_of,
    process_figures,
    wait_until,
)

pytestmark = pytest.mark.timeout(420)

SERVERS = ("gateway", "llm", "video")
SCRIPT_THREADS, VIDEO_THREADS = 6, 2  # 8 calls in flight: the gateway's default max_queue
SCRIPT_CALLS, VIDEO_CALLS = 300, 30
WARMUP_SCRIPT_CALLS, WARMUP_VIDEO_CALLS = 48, 6
RSS_TOLERANCE = 0.10
# Threads a bounded pool may still add after the warm-up without any leak: the gateway joins each
# video's clips in a pool of JOIN_WORKERS threads, started one by one as joins overlap, and whether
# two joins overlapped during the warm-up is chance. A leak grows with the calls: hundreds here.
POOL_THREADS = {"gateway": JOIN_WORKERS - 1, "llm": 0, "video": 0}
# gRPC's event engine adds worker threads under load and retires them once they have idled a while:
# the idle figures are read after the servers have settled, within this many seconds.
SETTLE_SECONDS = 45
RPCS = "scriptreel_rpc_requests_total"
SUBJECTS = ["a mountain bike", "a coffee grinder", "a rain jacket", "a city at night", "a sailing boat"]


@dataclass
class Phase:
    """Outcome of one batch of calls."""

    calls: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., LocalStack]) -> Iterator[LocalStack]:
    stack = start_stack("soak")
    yield stack
    assert stack.stop() == {"gateway": 0, "llm": 0, "video": 0}


def _write_script(stub: gw_grpc.GatewayServiceStub, i: int) -> None:
    request = gw.WriteScriptRequest(brief=f"a teaser for {SUBJECTS[i % 5]}, take {i}", num_scenes=1 + i % 4)
    reply = stub.WriteScript(request, timeout=120)
    assert len(reply.script.scenes) == request.num_scenes


def _create_video(stub: gw_grpc.GatewayServiceStub, i: int) -> None:
    video = gw.VideoParameters(width=32, height=32, num_frames=4, fps=8, num_inference_steps=2, seed=i + 1)
    request = gw.CreateVideoRequest(brief=f"a short clip of {SUBJECTS[i % 5]}", num_scenes=1, video=video)
    events = list(stub.CreateVideo(request, timeout=180))
    assert events[-1].summary.num_frames == 4 and events[-1].summary.size_bytes > 0


def _worker(
    call: Callable[[gw_grpc.GatewayServiceStub, int], None],
    stub: gw_grpc.GatewayServiceStub,
    first: int,
    count: int,
    phase: Phase,
    lock: threading.Lock,
) -> None:
    for i in range(first, first + count):
        try:
            call(stub, i)
        except (grpc.RpcError, AssertionError) as exc:
            text = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else repr(exc)
            with lock:
                phase.failures.append(f"{call.__name__}[{i}]: {text}")
        with lock:
            phase.calls += 1


def run_phase(
    stack: LocalStack, stub: gw_grpc.GatewayServiceStub, script_calls: int, video_calls: int
) -> Phase:
    """Make the calls from 8 threads while sampling each server's figures every half second."""
    phase, lock, done = Phase(), threading.Lock(), threading.Event()
    pids = {name: pid_of(stack.servers[name]) for name in SERVERS}
    peaks = {name: process_figures(pid).as_dict() for name, pid in pids.items()}

    def sample() -> None:
        while not done.wait(0.5):
            for name, pid in pids.items():
                try:
                    figures = process_figures(pid).as_dict()
                except (ProcessLookupError, FileNotFoundError):
                    return  # a server died: the checks after the phase say which
                for key, value in figures.items():
                    peaks[name][key] = max(peaks[name][key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    with ThreadPoolExecutor(SCRIPT_THREADS + VIDEO_THREADS) as pool:
        per_script, per_video = script_calls // SCRIPT_THREADS, video_calls // VIDEO_THREADS
        jobs = [
            pool.submit(_worker, _write_script, stub, t * per_script, per_script, phase, lock)
            for t in range(SCRIPT_THREADS)
        ]
        jobs += [
            pool.submit(_worker, _create_video, stub, t * per_video, per_video, phase, lock)
            for t in range(VIDEO_THREADS)
        ]
        for job in jobs:
            job.result(timeout=400)
    phase.seconds = time.monotonic() - start
    done.set()
    sampler.join()
    phase.peaks = peaks
    return phase


def quiet_figures(
    stack: LocalStack, ceiling: dict[str, ProcessFigures] | None = None
) -> dict[str, ProcessFigures]:
    """Each server's figures once idle: after the per-request threads have ended (SETTLE_SECONDS)."""

    def read() -> dict[str, ProcessFigures]:
        return {name: process_figures(pid_of(stack.servers[name])) for name in SERVERS}

    time.sleep(1.0)
    if ceiling is not None:
        wait_until(
            lambda: all(
                f.threads <= ceiling[n].threads + POOL_THREADS[n] and f.fds <= ceiling[n].fds
                for n, f in read().items()
            ),
            timeout=SETTLE_SECONDS,
            interval=0.25,
        )
    return read()


def test_soak_every_call_answered_with_flat_memory_threads_and_fds(stack, tmp_path):
    with stack.servers["gateway"].channel() as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        started = quiet_figures(stack)
        warmup = run_phase(stack, stub, WARMUP_SCRIPT_CALLS, WARMUP_VIDEO_CALLS)
        baseline = quiet_figures(stack)
        soak = run_phase(stack, stub, SCRIPT_CALLS, VIDEO_CALLS)
        end = quiet_figures(stack, ceiling=baseline)

    figures = {
        "command": ".venv/bin/python -m pytest tests/reliability/test_soak.py -q -s",
        "concurrency": SCRIPT_THREADS + VIDEO_THREADS,
        "warmup": {
            "calls": warmup.calls,
            "failures": len(warmup.failures),
            "seconds": round(warmup.seconds, 1),
        },
        "soak": {
            "write_script_calls": SCRIPT_CALLS,
            "create_video_calls": VIDEO_CALLS,
            "calls": soak.calls,
            "failures": len(soak.failures),
            "failure_samples": soak.failures[:5],
            "seconds": round(soak.seconds, 1),
        },
        "servers": {
            name: {
                "started": started[name].as_dict(),
                "after_warmup": baseline[name].as_dict(),
                "end": end[name].as_dict(),
                "peak_during_soak": soak.peaks[name],
                "rss_change": round(end[name].rss_bytes / baseline[name].rss_bytes - 1, 4),
            }
            for name in SERVERS
        },
        "upstream_rpcs_ok": {
            "llm Generate": metric(stack.ports["llm"][1], RPCS, method="Generate", code="OK"),
            "video GenerateVideo": metric(stack.ports["video"][1], RPCS, method="GenerateVideo", code="OK"),
        },
        "internal_or_unknown_rpcs": error_counts(stack),
    }
    text = json.dumps(figures, indent=2)
    (tmp_path / "soak.json").write_text(text)
    print(f"\nsoak figures ({tmp_path / 'soak.json'}):\n{text}")

    assert warmup.failures == [] and soak.failures == []
    assert soak.calls == SCRIPT_CALLS + VIDEO_CALLS
    assert figures["internal_or_unknown_rpcs"] == {name: 0 for name in SERVERS}
    calls = SCRIPT_CALLS + VIDEO_CALLS + WARMUP_SCRIPT_CALLS + WARMUP_VIDEO_CALLS
    assert figures["upstream_rpcs_ok"] == {  # one Generate per call, one GenerateVideo per video
        "llm Generate": calls,
        "video GenerateVideo": VIDEO_CALLS + WARMUP_VIDEO_CALLS,
    }
    for name in SERVERS:
        change = figures["servers"][name]["rss_change"]
        assert abs(change) <= RSS_TOLERANCE, f"{name}: resident memory changed by {change:+.1%}"
        assert end[name].threads <= baseline[name].threads + POOL_THREADS[name], f"{name}: threads grew"
        assert end[name].fds <= baseline[name].fds, f"{name}: open file descriptors grew"
