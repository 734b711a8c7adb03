"""`python -m services.probe grpc HOST:PORT | http URL`: exit 0 when the service is healthy
(gRPC health SERVING, or HTTP 200), 1 otherwise. Used by container healthchecks."""

from __future__ import annotations

import argparse
import sys

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc


def grpc_serving(address: str, timeout: float) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str, timeout: float) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.probe", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["grpc", "http"])
    parser.add_argument("target", help="HOST:PORT for grpc, a URL for http")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    healthy = grpc_serving(args.target, args.timeout) if args.kind == "grpc" else http_ok(args.target, args.timeout)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
