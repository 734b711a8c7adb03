"""Service settings: flags over environment over defaults, read only when parsed; invalid
settings exit with status 2 and a message instead of a traceback."""

from __future__ import annotations

import pytest

from services.drafter.settings import parse_settings as parse_drafter
from services.verifier.settings import parse_settings as parse_verifier
from specdec.config import DEFAULT_PREFIX_CACHE_TOKENS


def test_flags_override_environment_override_defaults(monkeypatch) -> None:
    assert parse_verifier([]).port == 8000
    monkeypatch.setenv("SPECDEC_VERIFIER_PORT", "9001")
    monkeypatch.setenv("SPECDEC_VERIFIER_API_KEY", "from-env")
    settings = parse_verifier(["--port", "9002", "--drafter", "remote", "--drafter-address", "10.0.0.5:50051", "--max-queue", "0"])
    assert (settings.port, settings.drafter, settings.drafter_address, settings.max_queue) == (9002, "remote", "10.0.0.5:50051", 0)
    assert settings.api_key.get_secret_value() == "from-env"
    assert parse_verifier([]).port == 9001
    assert parse_verifier([]).activations == "float32"
    monkeypatch.setenv("SPECDEC_VERIFIER_ACTIVATIONS", "int8")
    assert parse_verifier([]).activations == "int8"
    assert parse_verifier([]).prefix_cache_tokens == DEFAULT_PREFIX_CACHE_TOKENS
    assert parse_verifier(["--prefix-cache-tokens", "0"]).prefix_cache_tokens == 0


def test_empty_environment_values_mean_unset(monkeypatch) -> None:
    monkeypatch.setenv("SPECDEC_VERIFIER_API_KEY", "")
    monkeypatch.setenv("SPECDEC_DRAFTER_HEAD", "")
    assert parse_verifier([]).api_key is None
    assert parse_drafter([]).head is None


def test_drafter_tree_settings(monkeypatch) -> None:
    monkeypatch.setenv("SPECDEC_DRAFTER_DEPTH", "3")
    settings = parse_drafter(["--head", "random", "--top-k", "4", "--total-tokens", "8", "--max-sessions", "2"])
    assert (settings.head, settings.max_sessions) == ("random", 2)
    assert (settings.tree().top_k, settings.tree().depth, settings.tree().total_tokens) == (4, 3, 8)


@pytest.mark.parametrize("argv", [["--max-queue", "-1"], ["--port", "70000"], ["--dtype", "float8"], ["--drafter-timeout", "0"], ["--activations", "int4"], ["--prefix-cache-tokens", "-1"]])
def test_invalid_verifier_settings_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_verifier(argv)
    assert exit_info.value.code == 2
    assert "python -m services.verifier" in capsys.readouterr().err


def test_remote_drafter_address_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SPECDEC_VERIFIER_DRAFTER", "remote")
    monkeypatch.setenv("SPECDEC_VERIFIER_DRAFTER_ADDRESS", "drafter:50051")
    settings = parse_verifier([])
    assert (settings.drafter, settings.drafter_address) == ("remote", "drafter:50051")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--drafter", "remote"], "--drafter remote needs --drafter-address HOST:PORT"),
        (["--drafter", "remote", "--drafter-address", "drafter"], "--drafter remote needs --drafter-address HOST:PORT"),
        (["--drafter-address", "drafter:50051"], "--drafter-address is for --drafter remote, not --drafter embedded"),
        (["--drafter", "none", "--drafter-address", "drafter:50051"], "--drafter-address is for --drafter remote, not --drafter none"),
        (["--drafter", "127.0.0.1:50051"], "drafter"),
    ],
)
def test_drafter_mode_and_address_are_checked_at_start(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_verifier(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_drafter_settings_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_drafter(["--max-sessions", "0"])
    assert exit_info.value.code == 2
