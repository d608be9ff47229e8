"""Typed settings shared by the three servers.

Each server has one settings class (a subclass of `ServerSettings`) built once in its `__main__` by
`load_settings`, and passed down explicitly. Precedence, lowest to highest: field defaults, then
environment variables (`SCRIPTREEL_<SERVER>_<FIELD>`), then command-line flags (`--field value`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vram.plan import Policy
from vram.sizes import parse_bytes


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_list)]


class ServerSettings(BaseSettings):
    """Settings every gRPC server has.

    Attributes:
        host: Address the gRPC listener binds (use 0.0.0.0 in containers).
        port: gRPC port (0 picks a free one; the chosen port is logged).
        metrics_host: Address of the Prometheus /metrics HTTP listener.
        metrics_port: Port of /metrics (0 picks a free one; negative disables it).
        grace_seconds: On SIGTERM, how long in-flight requests may run before the server stops.
        max_queue: Requests admitted at once (running + waiting); more get RESOURCE_EXHAUSTED.
        tls_cert: PEM certificate of the listener; with tls_key, the listener speaks TLS only.
        tls_key: PEM private key of the listener.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
        log_level: Python logging level name.
    """

    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=True)

    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    grace_seconds: float = 30.0
    max_queue: int = Field(default=16, ge=1)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        """host:port for the gRPC listener."""
        return f"{self.host}:{self.port}"


class ModelServerSettings(ServerSettings):
    """Settings of a server that owns a model and a precision policy (DESIGN.md section 3).

    Attributes:
        model_dir: Local model folder (a transformers or diffusers layout).
        device: auto (cuda:0 when present, else cpu), cpu, cuda or cuda:N.
        precision: auto, fp32, fp16, bf16, fp8, int8 or int4.
        keep_fp32: Comma-separated module-name patterns (regular expressions) kept in FP32.
        vram_budget: Hard memory cap of this process ("12GiB"); empty for the whole device.
        allow_fallback: Let a failed load or non-finite warm-up fall back FP16 -> BF16 -> FP32.
        trust_remote_code: Allow model folders to run their own Python code (off by default).
        release_cache_above: After a request, release the allocator's cache above this size.
        min_free: Warn (log + gauge) when free memory under the budget falls below this.
    """

    model_dir: Path = Path("models/unset")
    device: str = "auto"
    precision: str = "auto"
    keep_fp32: CommaList = ()
    vram_budget: str = ""
    allow_fallback: bool = True
    trust_remote_code: bool = False
    release_cache_above: str = "1GiB"
    min_free: str = "512MiB"

    @field_validator("vram_budget", "release_cache_above", "min_free")
    @classmethod
    def _is_size(cls, value: str) -> str:
        parse_bytes(value)
        return value

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        allowed = ("auto", "fp32", "fp16", "bf16", "fp8", "int8", "int4")
        if value not in allowed:
            raise ValueError(f"precision must be one of {', '.join(allowed)}")
        return value

    @property
    def budget_bytes(self) -> int | None:
        """The budget in bytes, or None for the whole device."""
        return parse_bytes(self.vram_budget)

    def policy(self, offload: str = "none", supports_offload: bool = False) -> Policy:
        """The precision policy these settings describe."""
        return Policy(
            precision=self.precision,
            keep_fp32=self.keep_fp32,
            budget_bytes=self.budget_bytes,
            offload=offload,
            allow_fallback=self.allow_fallback,
            supports_offload=supports_offload,
        )


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Build settings from defaults, environment and command-line flags, in that order of precedence."""
    return cls(_cli_parse_args=list(argv) if argv is not None else True)  # type: ignore[call-arg]
