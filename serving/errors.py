"""The small family of errors engines raise. No gRPC here: `serving.status` maps them to status codes.

Engines and the gateway's orchestration raise these; anything else that escapes a handler becomes
INTERNAL with a generic message (details go to the log, never to the wire).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class ScriptreelError(Exception):
    """Base of the errors with a defined status code."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ScriptreelError):
    """The request is malformed: INVALID_ARGUMENT with field violations."""

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """One violation of one field."""
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotReady(ScriptreelError):
    """Model not loaded, server draining, or upstream down: UNAVAILABLE."""


class ResourceExhausted(ScriptreelError):
    """Out of GPU memory, queue full, or over budget: RESOURCE_EXHAUSTED (with RetryInfo)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ScriptreelError):
    """The request's deadline passed before the work finished: DEADLINE_EXCEEDED."""


class Cancelled(ScriptreelError):
    """The client cancelled: CANCELLED."""


class NonFiniteOutput(ScriptreelError):
    """The model produced NaN or Inf (logits or latents): INTERNAL with this clear message."""


class Unauthenticated(ScriptreelError):
    """Missing or wrong credentials: UNAUTHENTICATED."""


class UpstreamError(ScriptreelError):
    """An upstream answered with a status the gateway passes on (code is a grpc.StatusCode name).

    `details` are the google.rpc.Status details of the upstream's answer (packed BadRequest,
    RetryInfo), passed on as they are so the client can still act on them.
    """

    def __init__(self, message: str, code_name: str, details: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.code_name = code_name
        self.details = tuple(details)


def collect(violations: list[FieldViolation]) -> None:
    """Raise one InvalidArgument listing every violation, if there are any."""
    if violations:
        text = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"invalid request: {text}", violations)
