"""A real Prometheus server for tests: scrapes given targets, evaluates deploy/prometheus/rules.yml.

with running_prometheus({"scriptreel-llm": ["127.0.0.1:9102"]}, tmp_path) as prom:
    prom.wait_for(lambda: prom.query('up == 1'))
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from deploy_commands import REPO, tool

RULES_FILE = REPO / "deploy" / "prometheus" / "rules.yml"
T = TypeVar("T")


class PrometheusApi:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> and return its data, failing on an error status."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Evaluate an instant PromQL query; returns the result's series (a vector)."""
        data = self.get("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [data]

    def rules(self) -> list[dict]:
        """Every alerting rule, with its health, last error and state."""
        return [rule for group in self.get("rules")["groups"] for rule in group["rules"]]

    @staticmethod
    def wait_for(check: Callable[[], T], timeout: float = 30, what: str = "condition") -> T:
        """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            assert time.monotonic() < deadline, f"Prometheus: timed out waiting for {what}"
            time.sleep(0.5)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_prometheus(
    targets: Mapping[str, Sequence[str]], workdir: Path, rule_files: Sequence[Path] = (RULES_FILE,)
) -> Iterator[PrometheusApi]:
    """Start Prometheus scraping `targets` (job -> ["host:port"]) every second; stop it on exit."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
            for job, addresses in targets.items()
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = PrometheusApi(f"http://127.0.0.1:{port}")
    try:
        api.wait_for(lambda: _ready(api.url, process), what="/-/ready")
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ready(url: str, process: subprocess.Popen) -> bool:
    assert process.poll() is None, f"prometheus exited with {process.returncode}; see its log"
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
