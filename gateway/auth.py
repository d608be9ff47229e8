"""The gateway's optional bearer token."""

from __future__ import annotations

import hmac

import grpc

from serving.errors import Unauthenticated


def bearer_token_check(token: str):  # type: ignore[no-untyped-def]
    """A refusal hook for GrpcServer: requests without `authorization: Bearer <token>` are refused."""
    expected = f"Bearer {token}".encode()

    def refuse(path: str, context: grpc.aio.ServicerContext) -> BaseException | None:
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, expected):
            return None
        return Unauthenticated("missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    return refuse
