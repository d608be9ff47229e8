"""Real servers on loopback with the tiny models, shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc


@pytest.fixture(scope="session")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """LLM (tiny GLM), video (tiny SVD) and gateway servers as child processes on free ports."""
    logs = tmp_path_factory.mktemp("stack-logs")
    stack = LocalStack.on_free_ports(models_dir / "llm", models_dir / "svd", logs)
    stack.start()
    yield stack
    codes = stack.stop()
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture(scope="session")
def channels(stack: LocalStack) -> Iterator[dict[str, grpc.Channel]]:
    """Blocking channels to each server."""
    chans = {name: grpc.insecure_channel(server.target) for name, server in stack.servers.items()}
    yield chans
    for chan in chans.values():
        chan.close()


@pytest.fixture(scope="session")
def gateway(channels: dict[str, grpc.Channel]) -> gw_grpc.GatewayServiceStub:
    """A gateway client."""
    return gw_grpc.GatewayServiceStub(channels["gateway"])


@pytest.fixture(scope="session")
def llm(channels: dict[str, grpc.Channel]) -> llm_grpc.LlmServiceStub:
    """An LLM server client."""
    return llm_grpc.LlmServiceStub(channels["llm"])


@pytest.fixture(scope="session")
def video(channels: dict[str, grpc.Channel]) -> video_grpc.VideoServiceStub:
    """A video server client."""
    return video_grpc.VideoServiceStub(channels["video"])
