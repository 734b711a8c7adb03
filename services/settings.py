"""Command-line + environment settings parsing shared by both services: flags from argv (None:
sys.argv), then the environment, then defaults; invalid settings exit 2 with a message."""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp

S = TypeVar("S", bound=BaseSettings)


def parse_or_exit(settings_class: type[S], argv: list[str] | None, program: str) -> S:
    try:
        return CliApp.run(settings_class, cli_args=argv)
    except ValidationError as exc:
        print(f"{program}: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
