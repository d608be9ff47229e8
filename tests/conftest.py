"""Fixtures shared by every test: the tiny models, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_models.__main__ import main as build_models

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models: `make models` output when present, else built into a temporary folder."""
    built = Path(os.environ.get("SCRIPTREEL_TEST_MODELS", REPO / "models"))
    if (built / ".built").exists():
        return built
    out = tmp_path_factory.mktemp("models")
    build_models([str(out)])
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked gpu when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
