"""`python -m services.verifier`: load the target and its drafter, then serve the HTTP API."""

from __future__ import annotations

import logging
import sys

import uvicorn

from services.verifier.app import create_app
from services.verifier.engine import build_engine
from services.verifier.settings import parse_settings
from specdec.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = build_engine(settings)
    except ConfigError as exc:
        print(f"verifier: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(engine, settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=settings.grace_seconds)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
