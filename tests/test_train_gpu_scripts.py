"""The GPU scripts in heads/gpu/ stay runnable: the smoke check passes on the CPU, the training
script parses, answers --help and refuses bad settings before it starts any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_check_passes_on_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "heads/gpu/smoke.py"), "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    checks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [c["check"] for c in checks] == ["regenerate", "fit", "fit", "fit"] + ["greedy"] * 6
    assert all(c["last_loss"] < c["first_loss"] for c in checks if c["check"] == "fit")
    greedy = [c for c in checks if c["check"] == "greedy"]
    assert all(c["mismatches"] == 0 and c["tokens"] > 0 for c in greedy)
    oracle = [c for c in greedy if c["drafter"] == "oracle"]
    assert all(c["spec_target_forwards"] < c["tokens"] / 2 for c in oracle)  # deep trees were accepted


def test_train_script_parses_and_has_help():
    script = ROOT / "heads/gpu/train.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "BUDGET_S" in out.stdout and "CONV" in out.stdout


def test_train_script_refuses_bad_settings_before_any_work(tmp_path):
    script = ROOT / "heads/gpu/train.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("CONV", "FITS")}
    env["WORK"] = str(tmp_path / "work")
    bogus = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, cwd=ROOT, env={**env, "FITS": "fspad bogus"})
    assert bogus.returncode == 2 and "unknown fit bogus" in bogus.stderr
    no_data = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)
    assert no_data.returncode != 0 and "CONV" in no_data.stderr
    assert not (tmp_path / "work").exists()  # nothing was started
