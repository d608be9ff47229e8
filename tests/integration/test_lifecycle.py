"""A model server's health: NOT_SERVING while it loads, SERVING once warmed up, a clean exit on SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.stack import free_port, free_ports
from scriptreel.video.v1 import video_service_pb2 as video_pb
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_the_ports_of_a_test_stack_are_distinct() -> None:
    """Chosen together, never twice: one at a time the system may give a port it has just given."""
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(0 < p < 65536 for p in ports)


def test_health_goes_from_not_serving_to_serving_and_exits_cleanly(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SCRIPTREEL_VIDEO_MODEL_DIR": str(models_dir / "svd"),
        "SCRIPTREEL_VIDEO_PORT": str(port),
        "SCRIPTREEL_VIDEO_METRICS_PORT": "-1",
    }
    with (tmp_path / "video.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "video_server"], env=env, stdout=log, stderr=log)
    seen: list[int] = []
    early_info_code = None
    try:
        # Reconnect at once: with gRPC's default backoff (1 s, growing) a connection refused before the
        # server listens could be retried only after a quick load had finished, and NOT_SERVING missed.
        fast = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20)]
        fast.append(("grpc.max_reconnect_backoff_ms", 100))
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=fast) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and SERVING not in seen:
                assert process.poll() is None, (tmp_path / "video.log").read_text()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                except grpc.RpcError:
                    time.sleep(0.02)  # not listening yet
                    continue
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == NOT_SERVING and early_info_code is None:
                    try:
                        video_grpc.VideoServiceStub(channel).GetModelInfo(
                            video_pb.GetModelInfoRequest(), timeout=5
                        )
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        code = exc.code()
                    # counts only if the server was still loading when it answered
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING:
                        early_info_code = code
                time.sleep(0.02)
        assert seen == [NOT_SERVING, SERVING], seen
        assert early_info_code == grpc.StatusCode.UNAVAILABLE  # the model is still loading
    finally:
        process.terminate()
        assert process.wait(60) == 0
