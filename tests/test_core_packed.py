"""oneDNN-packed linear layers: same products as F.linear, same state dicts, safe to move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specdec.head import DraftHead
from specdec.packed import PackedLinear, pack_linears, packing_enabled
from tests.tiny import tiny_head, tiny_runner

pytestmark = pytest.mark.skipif(
    not packing_enabled(torch.zeros(1)), reason="this torch build has no oneDNN (the layers fall back to F.linear)"
)


@pytest.mark.parametrize("rows", [(), (1,), (7,), (2, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_f_linear(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear.weight, linear.bias)
    assert packed.packed is not None
    x = torch.randn(*rows, 48)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


def test_state_dict_keys_and_moves():
    linear = nn.Linear(16, 8)
    packed = PackedLinear(linear.weight, linear.bias)
    assert packed.state_dict().keys() == linear.state_dict().keys()
    packed.to(torch.float64)
    assert packed.packed is None  # only float32 is packed; a moved layer never uses a stale copy
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight.double(), linear.bias.double()))
    packed.to(torch.float32)
    assert packed.packed is not None


def test_env_switch_turns_packing_off(monkeypatch):
    monkeypatch.setenv("SPECDEC_ONEDNN", "0")
    assert PackedLinear(torch.randn(4, 4)).packed is None


def test_packed_head_gives_the_same_outputs_and_saves_the_same(tmp_path):
    runner = tiny_runner(0)
    head = tiny_head(runner, "fspad", draft_vocab=32).eval()
    feats, toks = torch.randn(6, 32), torch.randint(0, 64, (6,))
    with torch.inference_mode():
        hidden, feature = head(feats, toks, torch.arange(6))
        logits = head.logits(hidden)
    head.save(tmp_path / "plain")
    head.pack_for_inference()
    assert not any(isinstance(m, nn.Linear) for m in head.modules())
    packed_lm_head = head._packed_lm_head[0]
    assert head.pack_for_inference()._packed_lm_head[0] is packed_lm_head  # packing twice repacks nothing
    with torch.inference_mode():
        packed_hidden, packed_feature = head(feats, toks, torch.arange(6))
        torch.testing.assert_close(packed_hidden, hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_feature, feature, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.logits(packed_hidden), logits, atol=1e-5, rtol=1e-5)
    head.save(tmp_path / "packed")
    reloaded = DraftHead.load(tmp_path / "packed", runner.embed_tokens, runner.lm_head.weight, runner.config)
    assert reloaded.state_dict().keys() == head.state_dict().keys()
    for name, tensor in DraftHead.load(tmp_path / "plain", runner.embed_tokens, runner.lm_head.weight).state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_pack_linears_replaces_nested_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    expected = model(x).detach()
    pack_linears(model)
    assert [type(m).__name__ for m in model.modules()].count("PackedLinear") == 2
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
