"""What the reliability tests observe from outside a server: /proc figures, metrics, health, details."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway.stack import LocalStack, ServerProcess
from tests.integration.helpers import scrape


@dataclass(frozen=True)
class ProcessFigures:
    """Resident memory, threads and open file descriptors of one process (from /proc)."""

    rss_bytes: int
    threads: int
    fds: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def process_figures(pid: int) -> ProcessFigures:
    """Read VmRSS and Threads from /proc/PID/status and count /proc/PID/fd.

    Raises:
        ProcessLookupError: The process has exited.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    if "VmRSS" not in fields:  # a zombie: the process has exited and not been reaped yet
        raise ProcessLookupError(f"process {pid} has exited")
    rss_kib = int(fields["VmRSS"].split()[0])
    return ProcessFigures(rss_kib * 1024, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd")))


def pid_of(server: ServerProcess) -> int:
    assert server.process is not None and server.process.poll() is None, f"{server.name} is not running"
    return server.process.pid


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    samples = scrape(port).get(name, [])
    return sum(value for sample_labels, value in samples if labels.items() <= sample_labels.items())


def settled_metric(port: int, name: str, quiet: float = 0.6, timeout: float = 15.0, **labels: str) -> float:
    """Poll a metric until it has not changed for `quiet` seconds; return that value.

    Used to show that work has stopped: a counter of steps or tokens that stays still.
    """
    deadline = time.monotonic() + timeout
    value, since = metric(port, name, **labels), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = metric(port, name, **labels)
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"{name} still changing after {timeout:.0f}s (last {value})")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def health(channel: grpc.Channel, timeout: float = 5.0) -> str:
    """The server's overall health status name (SERVING, NOT_SERVING, ...)."""
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def all_serving(stack: LocalStack) -> dict[str, str]:
    """Health of every server of a stack."""
    result = {}
    for name, server in stack.servers.items():
        with server.channel() as channel:
            result[name] = health(channel)
    return result


def retry_delay(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay of an error in seconds, or None without one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def error_counts(stack: LocalStack) -> dict[str, float]:
    """RPCs that ended INTERNAL or UNKNOWN, per server, from each server's /metrics."""
    counts = {}
    for name, (_, metrics_port) in stack.ports.items():
        samples = scrape(metrics_port).get("scriptreel_rpc_requests_total", [])
        counts[name] = sum(v for labels, v in samples if labels["code"] in ("INTERNAL", "UNKNOWN"))
    return counts
