"""`python -m gateway.stack`: the whole stack on this machine, for `make run`, `make demo` and tests.

Starts the LLM, video and gateway servers as child processes on loopback, waits until each is
SERVING, makes a video through the gateway, prints the status table, and serves until Ctrl-C (or
exits at once with --exit). Children are stopped with SIGTERM, so they drain like in production.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on loopback (for tests; the default stack uses the standard ports).

    The sockets stay bound until all are chosen: one at a time, the system may hand out a port it just
    gave (two servers of a stack then race for one port).
    """
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    """A free TCP port on loopback (see free_ports)."""
    return free_ports(1)[0]


@dataclass
class ServerProcess:
    """One server child process."""

    name: str
    module: str
    port: int
    metrics_port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    credentials: grpc.ChannelCredentials | None = None

    def channel(self) -> grpc.Channel:
        """A blocking channel to it: TLS with `credentials` when set, else plaintext."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    @property
    def target(self) -> str:
        """Its gRPC address."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Launch it, logging to log_path."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # A session of its own: Ctrl-C at the terminal reaches only the stack, which then drains the
        # servers one by one (a second signal during a server's shutdown would kill it).
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def wait_serving(self, timeout: float) -> None:
        """Poll the health service until SERVING; raise with the log's tail if it dies or times out."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} server exited with {self.process.returncode}:\n{self.tail()}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} server not SERVING after {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait for the drain; SIGKILL after `timeout`. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalStack:
    """LLM, video and gateway servers on loopback, with the given model folders.

    `extra_env` adds environment variables per server ("llm", "video", "gateway"); `credentials` are
    the channel credentials of a server whose listener speaks TLS (its health is checked with them).
    """

    llm_model: Path
    video_model: Path
    log_dir: Path = Path("out/logs")
    ports: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"gateway": (50051, 9101), "llm": (50052, 9102), "video": (50053, 9103)}
    )
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    servers: dict[str, ServerProcess] = field(default_factory=dict)
    credentials: dict[str, grpc.ChannelCredentials] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, llm_model: Path, video_model: Path, log_dir: Path, **kwargs: object) -> LocalStack:
        """A stack on free ports (tests)."""
        chosen = iter(free_ports(6))
        ports = {name: (next(chosen), next(chosen)) for name in ("gateway", "llm", "video")}
        return cls(llm_model, video_model, log_dir, ports, **kwargs)  # type: ignore[arg-type]

    def server_env(self, name: str) -> dict[str, str]:
        """Environment of one server's process."""
        port, metrics = self.ports[name]
        prefix = f"SCRIPTREEL_{name.upper()}_"
        env = {
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}PORT": str(port),
            f"{prefix}METRICS_PORT": str(metrics),
            f"{prefix}METRICS_HOST": "127.0.0.1",
            f"{prefix}GRACE_SECONDS": "20",
        }
        if name == "llm":
            env[f"{prefix}MODEL_DIR"] = str(self.llm_model)
        elif name == "video":
            env[f"{prefix}MODEL_DIR"] = str(self.video_model)
        else:
            env[f"{prefix}LLM_TARGET"] = f"127.0.0.1:{self.ports['llm'][0]}"
            env[f"{prefix}VIDEO_TARGET"] = f"127.0.0.1:{self.ports['video'][0]}"
        return {**env, **self.extra_env.get(name, {})}

    def start(self, timeout: float = 180) -> None:
        """Start the three servers and wait until all are SERVING."""
        for name, module in (("llm", "llm_server"), ("video", "video_server"), ("gateway", "gateway")):
            port, metrics = self.ports[name]
            self.servers[name] = ServerProcess(
                name,
                module,
                port,
                metrics,
                self.server_env(name),
                self.log_dir / f"{name}.log",
                credentials=self.credentials.get(name),
            )
            self.servers[name].start()
        try:
            for server in self.servers.values():
                server.wait_serving(timeout)
        except BaseException:
            self.stop()
            raise

    def restart(self, name: str, timeout: float = 180) -> None:
        """Start a stopped server again on the same ports."""
        self.servers[name].start()
        self.servers[name].wait_serving(timeout)

    def stop(self) -> dict[str, int | None]:
        """Stop all servers (gateway first); returns their exit codes."""
        return {
            name: self.servers[name].stop() for name in ("gateway", "llm", "video") if name in self.servers
        }

    @property
    def gateway_target(self) -> str:
        """The gateway's gRPC address."""
        return f"127.0.0.1:{self.ports['gateway'][0]}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of `make run` / `make demo`."""
    from gateway import cli

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder of the tiny models")
    parser.add_argument("--video-model", default="svd", help="svd (image-to-video) or t2v (text-to-video)")
    parser.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    parser.add_argument("--brief", default="a 20-second teaser for a mountain bike")
    parser.add_argument("--exit", action="store_true", help="exit after the video is written")
    args = parser.parse_args(argv)

    stack = LocalStack(args.models / "llm", args.models / args.video_model, args.out.parent / "logs")
    print(f"starting the stack (logs in {stack.log_dir}) ...", flush=True)
    stack.start()
    code = 1
    try:
        target = ["--target", stack.gateway_target]
        code = cli.main([*target, "video", args.brief, "-o", str(args.out)])
        cli.main([*target, "status"])
        if code == 0 and not args.exit:
            print(
                f"serving: gateway {stack.gateway_target}; metrics on :9101-9103. Ctrl-C stops.", flush=True
            )
            signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: drain the children
            while all(s.process and s.process.poll() is None for s in stack.servers.values()):
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        codes = stack.stop()
        print(f"stopped: {codes}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
