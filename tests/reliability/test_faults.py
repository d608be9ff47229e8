"""Faults: an upstream killed mid-request gives UNAVAILABLE; the gateway recovers when it returns.

Each model server is killed (SIGKILL, no drain) while the gateway is in the middle of a CreateVideo
that needs it, then restarted on the same port. The gateway is never restarted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from tests.reliability.probes import metric, pid_of, wait_until

pytestmark = pytest.mark.timeout(240)

SCRIPT_TOKENS = 1900  # greedy decoding runs to the limit: the script takes about 2 s to write
TINY = gw.VideoParameters(width=16, height=16, num_frames=2, num_inference_steps=1, seed=3)
LONG = gw.VideoParameters(width=64, height=64, num_frames=8, num_inference_steps=200, seed=3)


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., LocalStack]) -> Iterator[LocalStack]:
    stack = start_stack(
        "faults",
        extra_env={
            "llm": {"SCRIPTREEL_LLM_MAX_NEW_TOKENS_LIMIT": str(SCRIPT_TOKENS)},
            "gateway": {
                "SCRIPTREEL_GATEWAY_SCRIPT_MAX_NEW_TOKENS": str(SCRIPT_TOKENS),
                "SCRIPTREEL_GATEWAY_SCRIPT_TEMPERATURE": "0",
            },
        },
    )
    yield stack
    assert stack.stop() == {"gateway": 0, "llm": 0, "video": 0}


@pytest.fixture(scope="module")
def gateway(stack: LocalStack) -> Iterator[gw_grpc.GatewayServiceStub]:
    with stack.servers["gateway"].channel() as channel:
        yield gw_grpc.GatewayServiceStub(channel)


def _kill(stack: LocalStack, name: str) -> None:
    process = stack.servers[name].process
    assert process is not None
    process.kill()
    assert process.wait(10) == -9


def _unavailable(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    return str(info.value.details())


def _upstream_health(gateway: gw_grpc.GatewayServiceStub, name: str) -> str:
    status = gateway.GetStatus(gw.GetStatusRequest(), timeout=30)
    return next(u.health for u in status.upstreams if u.server == name)


def _recover(stack: LocalStack, gateway: gw_grpc.GatewayServiceStub, name: str) -> float:
    """Restart `name` on its port; return the seconds until the gateway sees it SERVING again."""
    stack.restart(name)
    start = time.monotonic()
    assert wait_until(lambda: _upstream_health(gateway, name) == "SERVING", timeout=15, interval=0.2)
    return time.monotonic() - start


def _create_video_succeeds(gateway: gw_grpc.GatewayServiceStub) -> None:
    request = gw.CreateVideoRequest(brief="a paper boat", num_scenes=1, video=TINY)
    events = list(gateway.CreateVideo(request, timeout=120))
    assert events[-1].summary.num_frames == 2 and events[-1].summary.size_bytes > 0


def test_llm_killed_during_create_video_gives_unavailable_then_recovers(stack, gateway):
    gateway_pid = pid_of(stack.servers["gateway"])
    llm_metrics = stack.ports["llm"][1]
    call = gateway.CreateVideo(
        gw.CreateVideoRequest(brief="a paper boat", num_scenes=1, video=TINY), timeout=120
    )
    # The gateway's Generate is decoding the script: kill the LLM server under it.
    assert wait_until(
        lambda: metric(llm_metrics, "scriptreel_llm_batch_size") == 1, timeout=20, interval=0.02
    )
    _kill(stack, "llm")
    message = _unavailable(lambda: list(call))
    assert message.startswith("llm server unavailable"), message

    # While it is down: new calls fail fast and clearly; the gateway itself stays up and says why.
    start = time.monotonic()
    message = _unavailable(lambda: list(gateway.CreateVideo(gw.CreateVideoRequest(brief="x"), timeout=60)))
    assert message.startswith("llm server unavailable") and time.monotonic() - start < 10, message
    assert _upstream_health(gateway, "llm") == "UNREACHABLE"

    seconds = _recover(stack, gateway, "llm")
    print(f"gateway saw the restarted llm server SERVING after {seconds:.1f}s")
    _create_video_succeeds(gateway)
    assert pid_of(stack.servers["gateway"]) == gateway_pid


def test_video_killed_during_create_video_gives_unavailable_then_recovers(stack, gateway):
    gateway_pid = pid_of(stack.servers["gateway"])
    call = gateway.CreateVideo(
        gw.CreateVideoRequest(brief="a paper boat", num_scenes=1, video=LONG), timeout=120
    )
    kinds = []
    while not kinds or kinds[-1] != "progress":  # the scene is rendering
        kinds.append(next(call).WhichOneof("event"))
    _kill(stack, "video")
    message = _unavailable(lambda: list(call))
    assert message.startswith("video server unavailable"), message

    seconds = _recover(stack, gateway, "video")
    print(f"gateway saw the restarted video server SERVING after {seconds:.1f}s")
    _create_video_succeeds(gateway)
    assert pid_of(stack.servers["gateway"]) == gateway_pid
