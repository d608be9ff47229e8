"""TLS and mutual TLS credentials from PEM files named in the settings."""

from __future__ import annotations

from pathlib import Path

import grpc

from serving.settings import ServerSettings


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for a listener, or None for plaintext.

    With `tls_client_ca` set, clients must present a certificate signed by that CA (mutual TLS).

    Raises:
        ValueError: Only one of tls_cert and tls_key is set.
    """
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("tls_cert and tls_key must be set together")
    pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """Client credentials: server verified against `ca`; `cert`/`key` for mutual TLS. None: plaintext."""
    if ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
