"""On a GPU: gauges against torch.cuda and NVML, budgets of two servers on one GPU, OOM survival.

Real servers as child processes on loopback, on the tiny models, sharing one CUDA device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.stack import LocalStack
from scriptreel.llm.v1 import llm_service_pb2 as llm_pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2 as video_pb
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc
from tests.integration.helpers import scrape
from vram.monitor import nvml_handle

pytestmark = pytest.mark.gpu
GiB = 2**30
LLM_BUDGET, VIDEO_BUDGET = 2 * GiB, 3 * GiB


@pytest.fixture(scope="module")
def gpu_stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """LLM and video servers on cuda:0, each under its own budget; the gateway on top."""
    env = {
        "llm": {"SCRIPTREEL_LLM_DEVICE": "cuda", "SCRIPTREEL_LLM_VRAM_BUDGET": str(LLM_BUDGET)},
        "video": {
            "SCRIPTREEL_VIDEO_DEVICE": "cuda",
            "SCRIPTREEL_VIDEO_VRAM_BUDGET": str(VIDEO_BUDGET),
            "SCRIPTREEL_VIDEO_PRECISION": "fp16",
            "SCRIPTREEL_VIDEO_MAX_WIDTH": "2048",
            "SCRIPTREEL_VIDEO_MAX_HEIGHT": "2048",
            "SCRIPTREEL_VIDEO_MAX_NUM_FRAMES": "128",
        },
    }
    stack = LocalStack.on_free_ports(
        models_dir / "llm", models_dir / "svd", tmp_path_factory.mktemp("gpu-logs"), extra_env=env
    )
    stack.start()
    yield stack
    assert all(code == 0 for code in stack.stop().values())


def _nvml() -> tuple[int, int]:
    import pynvml

    info = pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(0))
    return int(info.total), int(info.used)


def test_gauges_agree_with_torch_and_nvml(gpu_stack: LocalStack) -> None:
    total, used = _nvml()
    for name, budget in (("llm", LLM_BUDGET), ("video", VIDEO_BUDGET)):
        samples = scrape(gpu_stack.ports[name][1])
        value = {
            k: samples[f"scriptreel_gpu_memory_{k}_bytes"][0][1]
            for k in ("allocated", "reserved", "peak", "total", "used", "budget")
        }
        assert samples["scriptreel_gpu_memory_total_bytes"][0][0]["device"] == "cuda:0"
        assert value["total"] == total
        assert value["budget"] == budget
        assert 0 < value["allocated"] <= value["reserved"] <= budget
        assert value["peak"] >= value["allocated"]
        # NVML counts every process: at least this server's reserved memory, near what we read now
        assert value["reserved"] < value["used"] and abs(value["used"] - used) < 2 * GiB
        ((_, weights),) = samples["scriptreel_model_weights_bytes"]
        assert weights <= value["allocated"]
    # The LLM server captured CUDA graphs and timed its one-row step (a tiny model: well under 50 ms).
    ((_, step),) = scrape(gpu_stack.ports["llm"][1])["scriptreel_llm_decode_step_seconds"]
    assert 0 < step < 0.05


def test_over_budget_request_is_refused_and_the_next_one_succeeds(gpu_stack: LocalStack) -> None:
    with grpc.insecure_channel(gpu_stack.servers["video"].target) as channel:
        stub = video_grpc.VideoServiceStub(channel)
        huge = video_pb.GenerateVideoRequest(
            width=2048, height=2048, num_frames=128, num_inference_steps=1, image=_png(64, 64)
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GenerateVideo(huge, timeout=300))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        normal = video_pb.GenerateVideoRequest(
            width=64, height=64, num_frames=6, num_inference_steps=2, image=_png(64, 64)
        )
        events = list(stub.GenerateVideo(normal, timeout=300))
        assert events[-1].result.num_frames == 6
        assert events[-1].result.memory.peak_allocated_bytes <= VIDEO_BUDGET
    # the other server on the same GPU was not starved
    with grpc.insecure_channel(gpu_stack.servers["llm"].target) as channel:
        replies = list(
            llm_grpc.LlmServiceStub(channel).Generate(
                llm_pb.GenerateRequest(prompt="hello", max_new_tokens=4), timeout=60
            )
        )
        assert replies[-1].usage.completion_tokens >= 1
    samples = scrape(gpu_stack.ports["video"][1])
    refused = sum(v for _, v in samples.get("scriptreel_admission_rejected_total", []))
    ooms = sum(v for _, v in samples.get("scriptreel_cuda_oom_total", []))
    assert refused + ooms >= 1


def _png(width: int, height: int) -> bytes:
    from media.keyframe import render_keyframe

    return render_keyframe("test", width, height, seed=1)
