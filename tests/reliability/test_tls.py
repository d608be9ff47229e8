"""TLS on every listener, mutual TLS to the model servers, and the gateway's bearer token.

The stack: the LLM and video servers speak mutual TLS (they require a client certificate signed by the
test CA); the gateway speaks TLS to its clients, requires a bearer token, and reaches the model
servers with its own client certificate. Certificates are made for the test in a temporary folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import av
import grpc
import pytest

from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from scriptreel.llm.v1 import llm_service_pb2 as llm_pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2 as video_pb
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc
from tests.integration.helpers import scrape
from tests.reliability.certs import Pki, make_pki
from tests.reliability.probes import health

pytestmark = pytest.mark.timeout(240)
TOKEN = "s3cret-token-for-tests"
TINY_VIDEO = gw.VideoParameters(width=32, height=32, num_frames=3, fps=6, num_inference_steps=1, seed=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _creds(pki: Pki, client_cert: bool = True) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., LocalStack], pki: Pki) -> Iterator[LocalStack]:
    def mtls(prefix: str) -> dict[str, str]:
        return {
            f"{prefix}TLS_CERT": str(pki.server_cert),
            f"{prefix}TLS_KEY": str(pki.server_key),
            f"{prefix}TLS_CLIENT_CA": str(pki.ca),
        }

    gateway = {
        "SCRIPTREEL_GATEWAY_TLS_CERT": str(pki.server_cert),
        "SCRIPTREEL_GATEWAY_TLS_KEY": str(pki.server_key),
        "SCRIPTREEL_GATEWAY_AUTH_TOKEN": TOKEN,
        "SCRIPTREEL_GATEWAY_UPSTREAM_CA": str(pki.ca),
        "SCRIPTREEL_GATEWAY_UPSTREAM_CERT": str(pki.client_cert),
        "SCRIPTREEL_GATEWAY_UPSTREAM_KEY": str(pki.client_key),
        "SCRIPTREEL_GATEWAY_SCRIPT_MAX_NEW_TOKENS": "64",
    }
    stack = start_stack(
        "tls",
        extra_env={"llm": mtls("SCRIPTREEL_LLM_"), "video": mtls("SCRIPTREEL_VIDEO_"), "gateway": gateway},
        credentials={"llm": _creds(pki), "video": _creds(pki), "gateway": _creds(pki, client_cert=False)},
    )
    yield stack
    assert stack.stop() == {"gateway": 0, "llm": 0, "video": 0}


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize("server", ["gateway", "llm", "video"])
def test_a_plaintext_client_is_refused_by_a_tls_listener(stack, server):
    with grpc.insecure_channel(stack.servers[server].target) as channel:
        error = _refused(lambda: health(channel, timeout=3))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    with stack.servers[server].channel() as channel:
        assert health(channel) == "SERVING"


@pytest.mark.parametrize("server", ["llm", "video"])
def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(stack, pki, server):
    target = stack.servers[server].target
    rogue = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.rogue_key.read_bytes(),
        certificate_chain=pki.rogue_cert.read_bytes(),
    )
    for creds in (_creds(pki, client_cert=False), rogue):
        with grpc.secure_channel(target, creds) as channel:
            error = _refused(lambda channel=channel: health(channel, timeout=3))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()


def test_mutual_tls_with_the_right_certificates_serves(stack, pki):
    with stack.servers["llm"].channel() as channel:
        request = llm_pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=5, temperature=0)
        messages = list(llm_grpc.LlmServiceStub(channel).Generate(request, timeout=30))
    assert messages[-1].usage.completion_tokens >= 1
    with stack.servers["video"].channel() as channel:
        info = video_grpc.VideoServiceStub(channel).GetModelInfo(video_pb.GetModelInfoRequest(), timeout=10)
    assert info.modality == video_pb.MODALITY_IMAGE_TO_VIDEO


def test_the_bearer_token_is_enforced(stack):
    request = gw.WriteScriptRequest(brief="a kite over a beach", num_scenes=2)
    with stack.servers["gateway"].channel() as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            error = _refused(
                lambda metadata=metadata: stub.WriteScript(request, timeout=30, metadata=metadata)
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "bearer token" in error.details()
        # With the token, the gateway reaches the LLM server over mutual TLS.
        reply = stub.WriteScript(request, timeout=60, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert len(reply.script.scenes) == 2


def test_the_gateway_reaches_tls_upstreams_end_to_end(stack):
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with stack.servers["gateway"].channel() as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        status = stub.GetStatus(gw.GetStatusRequest(), timeout=30, metadata=auth)
        request = gw.CreateVideoRequest(brief="a lighthouse at dusk", num_scenes=1, video=TINY_VIDEO)
        events = list(stub.CreateVideo(request, timeout=120, metadata=auth))
    assert {u.server: (u.health, u.error) for u in status.upstreams} == {
        "llm": ("SERVING", ""),
        "video": ("SERVING", ""),
    }
    data = b"".join(e.chunk.data for e in events if e.WhichOneof("event") == "chunk")
    with av.open(io.BytesIO(data)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3


def test_metrics_stay_plain_http_on_their_own_port(stack):
    for name, (_, metrics_port) in stack.ports.items():
        assert scrape(metrics_port)["scriptreel_server_serving"][0][1] == 1.0, name
