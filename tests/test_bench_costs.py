"""`specdec costs` on a tiny random target: the curve's JSON and its bad inputs."""

from __future__ import annotations

import json

import pytest

from specdec.bench.costs import parse_shape, shape_name
from specdec.cli import main
from specdec.config import ConfigError, TreeConfig
from tests.tiny import tiny_runner


def test_shape_parsing():
    assert parse_shape("6:5:16") == TreeConfig(top_k=6, depth=5, total_tokens=16, min_prob=0.0, lookup_tokens=0)
    assert shape_name(TreeConfig(top_k=4, depth=3, total_tokens=8)) == "k4-d3-n8"
    with pytest.raises(ConfigError, match="K:D:N"):
        parse_shape("6x5")


def test_cli_measures_every_size_and_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("specdec.options.load_runner", lambda args: tiny_runner(3))
    out = tmp_path / "costs.json"
    argv = ["costs", "--sizes", "4,1,2", "--shapes", "2:2:4,3:3:8", "--context", "12", "--repeats", "2", "--head", "random", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    for series in ("forward_ms", "forward_logits_ms"):
        assert list(result[series]) == ["1", "2", "4"] and all(v > 0 for v in result[series].values())
    assert list(result["propose_ms"]) == ["k2-d2-n4", "k3-d3-n8"] and all(v > 0 for v in result["propose_ms"].values())
    assert result["config"]["context"] == 12 and "cpu" in result["machine"]
    assert "| 4 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sizes", "0,2"], "--sizes must be positive"),
        (["--sizes", "a"], "comma list of integers"),
        (["--shapes", "3:3"], "K:D:N"),
        (["--repeats", "0"], "at least 1"),
    ],
)
def test_cli_bad_input_exits_2(extra, message, monkeypatch, capsys):
    monkeypatch.setattr("specdec.options.load_runner", lambda args: tiny_runner(3))
    assert main(["costs", "--context", "8", *extra]) == 2
    assert message in capsys.readouterr().err


def test_default_shapes_start_with_the_default_tree(tmp_path, monkeypatch):
    monkeypatch.setattr("specdec.options.load_runner", lambda args: tiny_runner(3))
    out = tmp_path / "costs.json"
    assert main(["costs", "--sizes", "1", "--context", "8", "--repeats", "1", "--head", "random", "--json", str(out)]) == 0
    shapes = list(json.loads(out.read_text())["propose_ms"])
    assert shapes[0] == shape_name(TreeConfig()) and len(shapes) == 7
