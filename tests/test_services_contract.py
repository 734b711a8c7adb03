"""The wire contract: checked-in stubs match protos/drafter.proto, every field is commented,
and tensors survive the bytes + dtype + shape encoding."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

from services.rpc import drafter_pb2 as pb
from services.rpc import tensor_from_proto, tensor_to_proto
from tests.conftest import REPO

PROTO = REPO / "protos" / "drafter.proto"
STUBS = ["drafter_pb2.py", "drafter_pb2.pyi", "drafter_pb2_grpc.py"]


def test_checked_in_stubs_match_the_proto(tmp_path) -> None:
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    (tmp_path / "services" / "rpc").mkdir(parents=True)
    subprocess.run(["sh", "protos/generate.sh"], cwd=tmp_path, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, check=True)
    for name in STUBS:
        fresh = (tmp_path / "services" / "rpc" / name).read_text()
        assert fresh == (REPO / "services" / "rpc" / name).read_text(), f"{name} is stale: run protos/generate.sh"


def test_every_field_and_enum_value_is_commented() -> None:
    lines = PROTO.read_text().splitlines()
    field = re.compile(r"^\s*(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+;|^\s*\w+\s*=\s*\d+;")
    checked = 0
    for i, line in enumerate(lines):
        if field.match(line):
            checked += 1
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {line.strip()}"
    assert checked >= 30


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 1e-2), ("float32", 0.0)])
def test_tensor_round_trip(dtype: str, tol: float) -> None:
    x = torch.randn(7, 5)
    message = tensor_to_proto(x, dtype)
    assert list(message.shape) == [7, 5] and len(message.data) == 35 * (4 if dtype == "float32" else 2)
    y = tensor_from_proto(message)
    assert y.shape == x.shape and torch.allclose(y.float(), x, rtol=tol, atol=tol)


def test_malformed_tensors_are_rejected() -> None:
    good = tensor_to_proto(torch.ones(2, 3), "float16")
    with pytest.raises(ValueError):
        tensor_from_proto(pb.Tensor(data=good.data[:-1], dtype=good.dtype, shape=good.shape))
    with pytest.raises(ValueError):
        tensor_from_proto(pb.Tensor(data=good.data, dtype=pb.DTYPE_UNSPECIFIED, shape=good.shape))
    with pytest.raises(ValueError):
        tensor_from_proto(pb.Tensor(data=b"", dtype=good.dtype, shape=[-1, 0]))
