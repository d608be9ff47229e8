"""Stacks of real servers on loopback for the reliability tests, each on its own free ports.

Tests that kill, stop or overload servers start their own stack, so the shared stack of
tests/integration is never disturbed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.stack import LocalStack

StartStack = Callable[..., LocalStack]


@pytest.fixture(scope="module")
def start_stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartStack]:
    """Start a LocalStack (tiny GLM, tiny SVD, gateway) with per-server extra environment.

    Call as `start_stack("label", extra_env={...}, credentials={...})`; every stack started is
    stopped (SIGTERM, drain) when the module ends.
    """
    started: list[LocalStack] = []

    def start(label: str, **kwargs: object) -> LocalStack:
        logs = tmp_path_factory.mktemp(f"{label}-logs")
        stack = LocalStack.on_free_ports(models_dir / "llm", models_dir / "svd", logs, **kwargs)
        started.append(stack)
        stack.start()
        return stack

    yield start
    for stack in started:
        stack.stop()
