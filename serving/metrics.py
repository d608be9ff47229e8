"""Metrics every server exports: RPC counts and latencies, queue depth, serving state."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "scriptreel_rpc_requests", "RPCs handled, by final status code.", ["service", "method", "code"]
)
RPC_DURATION = Histogram(
    "scriptreel_rpc_duration_seconds",
    "RPC wall time until the last message.",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_DEPTH = Gauge("scriptreel_queue_depth", "Requests admitted and not finished.", ["service"])
QUEUE_CAPACITY = Gauge("scriptreel_queue_capacity", "Requests admitted at most at once.", ["service"])
SERVING = Gauge("scriptreel_server_serving", "1 when the server's health is SERVING.", ["service"])


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP listener in a daemon thread; returns its port (-1: disabled)."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
