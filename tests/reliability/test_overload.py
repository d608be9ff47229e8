"""Overload: full queues answer RESOURCE_EXHAUSTED with RetryInfo; deadlines and cancellation stop work.

The stack is sized to fill up at once: the video server admits one request, the LLM decodes one
sequence with one more waiting, the gateway admits one request. "Work stopped" is read from the
servers' own counters (denoising steps, generated tokens): they stay still once the call is over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from gateway.stack import LocalStack
from media.keyframe import render_keyframe
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from scriptreel.llm.v1 import llm_service_pb2 as llm_pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2 as video_pb
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc
from tests.reliability.probes import metric, retry_delay, settled_metric, wait_until

pytestmark = pytest.mark.timeout(240)

LONG_TOKENS = 1900  # greedy decoding of the tiny GLM runs to the limit: about 2 s on 2 CPU cores
LONG_STEPS = 200  # about 6 s of denoising at 64x64, 8 frames
STEPS = "scriptreel_video_steps_total"
TOKENS = "scriptreel_llm_generated_tokens_total"
IMAGE = render_keyframe("a red kite", 64, 64)


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., LocalStack]) -> Iterator[LocalStack]:
    stack = start_stack(
        "overload",
        extra_env={
            "video": {"SCRIPTREEL_VIDEO_MAX_QUEUE": "1"},
            "llm": {
                "SCRIPTREEL_LLM_MAX_BATCH_SIZE": "1",
                "SCRIPTREEL_LLM_MAX_QUEUE": "1",
                "SCRIPTREEL_LLM_MAX_NEW_TOKENS_LIMIT": str(LONG_TOKENS),
            },
            "gateway": {
                "SCRIPTREEL_GATEWAY_MAX_QUEUE": "1",
                "SCRIPTREEL_GATEWAY_SCRIPT_MAX_NEW_TOKENS": "64",
            },
        },
    )
    yield stack
    assert stack.stop() == {"gateway": 0, "llm": 0, "video": 0}


@pytest.fixture(scope="module")
def stubs(
    stack: LocalStack,
) -> Iterator[tuple[llm_grpc.LlmServiceStub, video_grpc.VideoServiceStub, gw_grpc.GatewayServiceStub]]:
    channels = [stack.servers[name].channel() for name in ("llm", "video", "gateway")]
    yield (
        llm_grpc.LlmServiceStub(channels[0]),
        video_grpc.VideoServiceStub(channels[1]),
        gw_grpc.GatewayServiceStub(channels[2]),
    )
    for channel in channels:
        channel.close()


def _metrics(stack: LocalStack, server: str) -> int:
    return stack.ports[server][1]


def _long_text(max_new_tokens: int = LONG_TOKENS) -> llm_pb.GenerateRequest:
    return llm_pb.GenerateRequest(prompt="hello", max_new_tokens=max_new_tokens, temperature=0)


def _video(steps: int, size: int = 64) -> video_pb.GenerateVideoRequest:
    return video_pb.GenerateVideoRequest(
        image=IMAGE,
        width=size,
        height=size,
        num_frames=8 if size == 64 else 2,
        num_inference_steps=steps,
        seed=1,
    )


def _error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _idle(stack: LocalStack, server: str) -> bool:
    """The server's admission count is back to zero."""
    return metric(_metrics(stack, server), "scriptreel_queue_depth", service=server) == 0


def test_llm_queue_full_is_resource_exhausted_and_cancelling_frees_it(stack, stubs):
    llm, _, _ = stubs
    port = _metrics(stack, "llm")
    running = llm.Generate(_long_text(), timeout=60)
    next(running)  # decoding: the batch of one is full
    assert wait_until(lambda: metric(port, "scriptreel_llm_batch_size") == 1, timeout=5)
    waiting = llm.Generate(_long_text(), timeout=60)
    assert wait_until(lambda: metric(port, "scriptreel_llm_queue_depth") == 1, timeout=10)

    error = _error(lambda: list(llm.Generate(_long_text(8), timeout=30)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert retry_delay(error) == pytest.approx(1.0)

    running.cancel()
    waiting.cancel()
    assert wait_until(
        lambda: (
            metric(port, "scriptreel_llm_queue_depth") == 0 and metric(port, "scriptreel_llm_batch_size") == 0
        ),
        timeout=10,
    )
    reply = list(llm.Generate(_long_text(8), timeout=30))
    assert reply[-1].usage.completion_tokens == 8


def test_llm_deadline_is_deadline_exceeded_and_decoding_stops(stack, stubs):
    llm, _, _ = stubs
    port = _metrics(stack, "llm")
    before = settled_metric(port, TOKENS)
    error = _error(lambda: list(llm.Generate(_long_text(), timeout=0.5)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    decoded = settled_metric(port, TOKENS) - before
    assert decoded < LONG_TOKENS, decoded  # stopped well before its end
    assert metric(port, "scriptreel_llm_batch_size") == 0
    start = time.monotonic()
    list(llm.Generate(_long_text(8), timeout=30))
    assert time.monotonic() - start < 5


def test_video_queue_full_is_resource_exhausted_also_through_the_gateway(stack, stubs):
    _, video, gateway = stubs
    port = _metrics(stack, "video")
    before = settled_metric(port, STEPS)
    running = video.GenerateVideo(_video(LONG_STEPS), timeout=60)
    assert next(running).progress.stage == "denoise"

    error = _error(lambda: list(video.GenerateVideo(_video(1, size=16), timeout=30)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert retry_delay(error) == pytest.approx(10.0)

    # The gateway passes the video server's answer on, RetryInfo included.
    request = gw.CreateVideoRequest(
        brief="a red kite", num_scenes=1, video=gw.VideoParameters(width=16, height=16, num_inference_steps=1)
    )
    error = _error(lambda: list(gateway.CreateVideo(request, timeout=60)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "video server" in error.details()
    assert retry_delay(error) == pytest.approx(10.0)

    # Cancelling the running request stops its denoising and frees the slot for the next one.
    running.cancel()
    assert 0 < settled_metric(port, STEPS) - before < LONG_STEPS
    assert wait_until(lambda: _idle(stack, "video"), timeout=10)
    events = list(video.GenerateVideo(_video(1, size=16), timeout=30))
    assert events[-1].result.num_frames == 2


def test_video_deadline_is_deadline_exceeded_and_rendering_stops(stack, stubs):
    _, video, _ = stubs
    port = _metrics(stack, "video")
    before = settled_metric(port, STEPS)
    error = _error(lambda: list(video.GenerateVideo(_video(LONG_STEPS), timeout=1.0)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < settled_metric(port, STEPS) - before < LONG_STEPS
    assert wait_until(lambda: _idle(stack, "video"), timeout=10)
    start = time.monotonic()
    events = list(video.GenerateVideo(_video(1, size=16), timeout=30))
    assert events[-1].WhichOneof("event") == "result" and time.monotonic() - start < 5


def _long_create_video() -> gw.CreateVideoRequest:
    return gw.CreateVideoRequest(
        brief="a red kite",
        num_scenes=1,
        video=gw.VideoParameters(width=64, height=64, num_frames=8, num_inference_steps=LONG_STEPS),
    )


def test_gateway_queue_full_and_a_cancelled_client_stops_upstream_work(stack, stubs):
    _, _, gateway = stubs
    port = _metrics(stack, "video")
    before = settled_metric(port, STEPS)
    running = gateway.CreateVideo(_long_create_video(), timeout=60)
    kinds = []
    while not kinds or kinds[-1] != "progress":  # the script, then the scene's first step
        kinds.append(next(running).WhichOneof("event"))

    error = _error(lambda: gateway.WriteScript(gw.WriteScriptRequest(brief="a kite"), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert retry_delay(error) == pytest.approx(1.0)

    running.cancel()  # the gateway cancels its GenerateVideo call: the video server stops denoising
    assert 0 < settled_metric(port, STEPS) - before < LONG_STEPS
    assert wait_until(lambda: _idle(stack, "video") and _idle(stack, "gateway"), timeout=10)
    reply = gateway.WriteScript(gw.WriteScriptRequest(brief="a kite", num_scenes=2), timeout=30)
    assert len(reply.script.scenes) == 2


def test_gateway_deadline_is_deadline_exceeded_and_upstream_work_stops(stack, stubs):
    _, _, gateway = stubs
    port = _metrics(stack, "video")
    before = settled_metric(port, STEPS)
    error = _error(lambda: list(gateway.CreateVideo(_long_create_video(), timeout=2.5)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < settled_metric(port, STEPS) - before < LONG_STEPS
    assert wait_until(lambda: _idle(stack, "video") and _idle(stack, "gateway"), timeout=10)
