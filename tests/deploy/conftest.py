"""A live stack for the deploy tests: the three servers on loopback with the tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc


@pytest.fixture(scope="session")
def live_metrics_targets(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Prometheus job name -> "host:port" of each server's /metrics, after one CreateVideo."""
    stack = LocalStack.on_free_ports(
        models_dir / "llm", models_dir / "svd", tmp_path_factory.mktemp("deploy-logs")
    )
    stack.start()
    try:
        video = gw.VideoParameters(width=64, height=48, num_frames=6, fps=6, num_inference_steps=2, seed=7)
        with grpc.insecure_channel(stack.servers["gateway"].target) as channel:
            request = gw.CreateVideoRequest(brief="a teaser for a mountain bike", num_scenes=1, video=video)
            events = list(gw_grpc.GatewayServiceStub(channel).CreateVideo(request, timeout=300))
        assert events[-1].WhichOneof("event") == "summary"
        yield {
            f"scriptreel-{name}": f"127.0.0.1:{server.metrics_port}" for name, server in stack.servers.items()
        }
    finally:
        stack.stop()
