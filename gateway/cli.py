"""`scriptreel`: the command line for people. Talks to the gateway over gRPC.

scriptreel script "a 20-second teaser for a mountain bike"
scriptreel video "a 20-second teaser for a mountain bike" -o teaser.mp4
scriptreel status
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from serving.tls import channel_credentials
from vram.sizes import format_bytes

console = Console(stderr=True)


def _out() -> Console:
    """Tables go to stdout, wide enough to read when stdout is a log rather than a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriptreel", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("SCRIPTREEL_TARGET", "127.0.0.1:50051"),
        help="gateway address (env SCRIPTREEL_TARGET)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("SCRIPTREEL_TOKEN", ""), help="bearer token (env SCRIPTREEL_TOKEN)"
    )
    parser.add_argument("--ca", type=Path, help="PEM CA of the gateway's TLS certificate (enables TLS)")
    parser.add_argument("--cert", type=Path, help="client certificate for mutual TLS")
    parser.add_argument("--key", type=Path, help="client key for mutual TLS")
    parser.add_argument("--timeout", type=float, default=3600.0, help="deadline of the call in seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("script", "write a script for a brief"), ("video", "create a video for a brief")):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("brief")
        cmd.add_argument("--scenes", type=int, default=0, help="number of scenes (default 3)")
        cmd.add_argument("--style", default="")
        cmd.add_argument("--language", default="")
    video = sub.choices["video"]
    video.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    video.add_argument("--image", type=Path, help="conditioning image for image-to-video models")
    for name in ("width", "height", "frames", "fps", "steps", "seed"):
        video.add_argument(f"--{name}", type=int, default=0)
    sub.add_parser("status", help="health, model, precision plan and memory of every server")
    return parser


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    creds = channel_credentials(args.ca, args.cert, args.key)
    if creds is None:
        return grpc.aio.insecure_channel(args.target)
    return grpc.aio.secure_channel(args.target, creds)


async def _run(args: argparse.Namespace) -> int:
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    async with _channel(args) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        if args.command == "script":
            reply = await stub.WriteScript(
                gw.WriteScriptRequest(
                    brief=args.brief, num_scenes=args.scenes, style=args.style, language=args.language
                ),
                timeout=args.timeout,
                metadata=metadata,
            )
            print_script(reply.script, reply.fallback_used)
        elif args.command == "video":
            await _video(stub, args, metadata)
        else:
            reply = await stub.GetStatus(gw.GetStatusRequest(), timeout=30, metadata=metadata)
            print_status(reply)
    return 0


async def _video(stub: gw_grpc.GatewayServiceStub, args: argparse.Namespace, metadata: object) -> None:
    request = gw.CreateVideoRequest(
        brief=args.brief,
        num_scenes=args.scenes,
        style=args.style,
        language=args.language,
        image=args.image.read_bytes() if args.image else b"",
        video=gw.VideoParameters(
            width=args.width,
            height=args.height,
            num_frames=args.frames,
            fps=args.fps,
            num_inference_steps=args.steps,
            seed=args.seed,
        ),
    )
    data = bytearray()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("writing the script", total=None)
        async for event in stub.CreateVideo(request, timeout=args.timeout, metadata=metadata):
            kind = event.WhichOneof("event")
            if kind == "script":
                bar.console.print(f"[bold]{event.script.title}[/bold] ({len(event.script.scenes)} scenes)")
            elif kind == "progress":
                p = event.progress
                label = "joining clips" if p.stage == "join" else f"scene {p.scene + 1}: {p.stage}"
                bar.update(task, description=label, completed=p.step, total=p.total_steps or None)
            elif kind == "chunk":
                data += event.chunk.data
            elif kind == "summary":
                summary = event.summary
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    timings = ", ".join(f"{t.stage} {t.seconds:.1f}s" for t in summary.timings)
    console.print(
        f"wrote {args.output} ({format_bytes(len(data))}, {summary.num_frames} frames "
        f"{summary.width}x{summary.height} @ {summary.fps} fps); {timings}"
    )


def print_script(script: gw.Script, fallback: bool) -> None:
    """Print a script as a table."""
    table = Table(title=script.title + (" (fallback script)" if fallback else ""))
    for column in ("#", "narration", "visual prompt", "s"):
        table.add_column(column)
    for scene in script.scenes:
        table.add_row(
            str(scene.index + 1), scene.narration, scene.visual_prompt, f"{scene.duration_seconds:g}"
        )
    _out().print(table)


def print_status(reply: gw.GetStatusResponse) -> None:
    """Print each upstream's health, model, plan and memory as a table."""
    table = Table(title="scriptreel servers")
    for column in (
        "server",
        "target",
        "health",
        "model",
        "precision plan",
        "weights",
        "allocated",
        "peak",
        "budget",
        "device",
    ):
        table.add_column(column)
    for up in reply.upstreams:
        info, mem = up.info, up.info.memory
        plan = info.plan
        plan_text = f"{plan.precision}/{plan.compute_dtype}" if plan.precision else "-"
        if plan.offload and plan.offload != "none":
            plan_text += f" offload={plan.offload}"
        if plan.keep_fp32:
            plan_text += f" fp32={','.join(plan.keep_fp32)}"
        table.add_row(
            up.server,
            up.target,
            up.health if not up.error else f"{up.health} ({up.error})",
            f"{info.architecture} ({info.parameter_count:,} params)" if info.architecture else "-",
            plan_text,
            format_bytes(mem.weights_bytes),
            format_bytes(mem.allocated_bytes),
            format_bytes(mem.peak_allocated_bytes),
            format_bytes(mem.budget_bytes) if mem.budget_bytes else "device",
            mem.device or "-",
        )
    _out().print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `scriptreel` console script."""
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
