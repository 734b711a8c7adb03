"""`python -m services.drafter --head PATH --host H --port P`: load a draft head and serve it
over gRPC with the standard health service; SIGTERM drains live sessions, then exits."""

from __future__ import annotations

import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.drafter.servicer import DrafterServicer
from services.drafter.settings import DrafterSettings, parse_settings
from services.rpc import CHANNEL_OPTIONS
from services.rpc import drafter_pb2 as pb
from services.rpc import drafter_pb2_grpc as pb_grpc
from specdec.options import DTYPES
from specdec.config import ConfigError
from specdec.drafter import HeadDrafter, load_head_drafter
from specdec.target import TargetRunner

log = logging.getLogger("specdec.drafter")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Drafter"].full_name


def load_drafter(settings: DrafterSettings) -> HeadDrafter:
    """The head plus the target embedding and LM head it shares; the target's decoder layers are
    dropped right away (the drafter never runs them)."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    runner = TargetRunner.load(settings.model, DTYPES[settings.dtype], settings.device)
    drafter = load_head_drafter(runner, settings.head, settings.tree())
    runner.model.model.layers = torch.nn.ModuleList()
    return drafter


def serve(settings: DrafterSettings, drafter: HeadDrafter) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    head_name = Path(settings.head).name if settings.head and settings.head != "random" else settings.head or "default"
    servicer = DrafterServicer(drafter, head_name, settings.max_sessions)
    # Each live session holds a worker thread for its stream; a few more serve Info and health.
    server = grpc.server(ThreadPoolExecutor(settings.max_sessions + 4, thread_name_prefix="rpc"), options=CHANNEL_OPTIONS)
    pb_grpc.add_DrafterServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.port}"
    if server.add_insecure_port(address) == 0:
        log.error("cannot listen on %s", address)
        return 1
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("drafter %s (%s, %s) serving on %s", head_name, drafter.head.cfg.variant, drafter.tree, address)

    def stop(signum: int, _frame) -> None:
        log.info("signal %d: draining %d live sessions for up to %.1fs", signum, servicer.active_sessions, settings.grace_seconds)
        health_servicer.enter_graceful_shutdown()
        server.stop(settings.grace_seconds)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait_for_termination()
    servicer.close()
    log.info("drafter stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        drafter = load_drafter(settings)
    except ConfigError as exc:
        print(f"drafter: error: {exc}", file=sys.stderr)
        return 2
    return serve(settings, drafter)


if __name__ == "__main__":
    sys.exit(main())
