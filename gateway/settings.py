"""Settings of the gateway (environment prefix SCRIPTREEL_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from serving.settings import ServerSettings


class GatewaySettings(ServerSettings):
    """The gateway's settings (see ServerSettings for the listener's).

    Attributes:
        llm_target: gRPC target of the LLM servers; dns:///name:port balances across replicas.
        video_target: gRPC target of the video servers.
        auth_token: When set, clients must send `authorization: Bearer <token>` (else UNAUTHENTICATED).
        upstream_ca: PEM CA to verify the upstreams' TLS certificates; empty for plaintext upstreams.
        upstream_cert: PEM client certificate for mutual TLS to the upstreams.
        upstream_key: PEM client key for mutual TLS to the upstreams.
        script_timeout_seconds: Deadline of each LLM call.
        scene_timeout_seconds: Deadline of each scene's video call.
        status_timeout_seconds: Deadline of health and model-info calls.
        script_max_new_tokens: Token limit of the script generation.
        script_temperature: Sampling temperature of the script generation.
    """

    model_config = SettingsConfigDict(env_prefix="SCRIPTREEL_GATEWAY_")

    port: int = 50051
    metrics_port: int = 9101
    max_queue: int = 8
    llm_target: str = "127.0.0.1:50052"
    video_target: str = "127.0.0.1:50053"
    auth_token: str = ""
    upstream_ca: Path | None = None
    upstream_cert: Path | None = None
    upstream_key: Path | None = None
    script_timeout_seconds: float = 120.0
    scene_timeout_seconds: float = 900.0
    status_timeout_seconds: float = 5.0
    script_max_new_tokens: int = 512
    script_temperature: float = 0.7
