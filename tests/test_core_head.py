"""Draft head and in-process drafter on a tiny target: caching, tree expansion, save/load."""

from __future__ import annotations

import pytest
import torch

from specdec.config import ConfigError, TreeConfig
from specdec.drafter import HeadDrafter, load_head_drafter
from specdec.head import DraftHead, HeadCache
from tests.tiny import tiny_head, tiny_runner


@pytest.mark.parametrize("variant", ["fspad", "eagle2"])
def test_cached_steps_equal_one_causal_forward(variant):
    runner = tiny_runner(0)
    head = tiny_head(runner, variant)
    feats, toks = torch.randn(9, 32), torch.randint(0, 64, (9,))
    full_h, full_f = head(feats, toks, torch.arange(9))
    cache = HeadCache()
    h1, f1 = head(feats[:4], toks[:4], torch.arange(4), None, cache)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)
    h2, f2 = head(feats[4:], toks[4:], torch.arange(4, 9), mask, cache)
    torch.testing.assert_close(torch.cat([h1, h2]), full_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([f1, f2]), full_f, atol=1e-5, rtol=1e-5)
    if variant == "eagle2":
        assert torch.equal(full_h, full_f)  # one output serves both losses
    else:
        assert not torch.allclose(full_h, full_f)


@torch.inference_mode()
def test_tree_children_are_the_heads_sequential_top_k():
    """Depth-2 nodes of a proposed tree are the top-k of the head run along their path."""
    runner = tiny_runner(1)
    head = tiny_head(runner, "fspad", draft_vocab=32).eval()
    k = 3
    drafter = HeadDrafter(head, TreeConfig(top_k=k, depth=2, total_tokens=1 + k + k * k, min_prob=0.0))
    tokens = [5, 9, 13, 2, 40, 7]
    feats = torch.randn(len(tokens) - 1, 32)
    tree = drafter.open(tokens, feats).propose()
    # reference: the head over the committed pairs, then one step per depth-1 child
    cache = HeadCache()
    hidden, feature = head(feats, torch.tensor(tokens[1:]), torch.arange(len(feats)), None, cache)
    root_top = head.d2t[torch.topk(head.logits(hidden[-1]), k).indices].tolist()
    children = [i for i, p in enumerate(tree.parents) if p == 0]
    assert [tree.tokens[c] for c in children] == root_top
    n = len(feats)
    for c in children:
        step_cache = HeadCache()
        step_cache.keys, step_cache.values = cache.keys.clone(), cache.values.clone()
        h, _ = head(feature[-1:], torch.tensor([tree.tokens[c]]), torch.tensor([n]), torch.ones(1, n + 1, dtype=torch.bool), step_cache)
        expected = set(head.d2t[torch.topk(head.logits(h[0]), k).indices].tolist())
        assert {tree.tokens[g] for g, p in enumerate(tree.parents) if p == c} == expected


def test_save_load_roundtrip_and_refusals(tmp_path):
    runner = tiny_runner(2)
    head = tiny_head(runner, "fspad", draft_vocab=16)
    head.save(tmp_path / "h")
    loaded = DraftHead.load(tmp_path / "h", runner.embed_tokens, runner.lm_head.weight, runner.config)
    assert torch.equal(loaded.d2t, head.d2t) and loaded.cfg == head.cfg
    x, t = torch.randn(3, 32), torch.tensor([1, 2, 3])
    torch.testing.assert_close(loaded(x, t, torch.arange(3))[0], head(x, t, torch.arange(3))[0], atol=2e-2, rtol=2e-2)
    other = tiny_runner(2, vocab=80)
    with pytest.raises(ConfigError, match="made for a target"):
        DraftHead.load(tmp_path / "h", other.embed_tokens, other.lm_head.weight, other.config)
    with pytest.raises(ConfigError, match="missing"):
        DraftHead.load(tmp_path / "nothing", runner.embed_tokens, runner.lm_head.weight, runner.config)


def test_default_head_is_random_for_a_target_it_was_not_trained_for(caplog):
    runner = tiny_runner(3)
    with caplog.at_level("WARNING", logger="specdec.drafter"):
        drafter = load_head_drafter(runner, None, TreeConfig())
    assert drafter.head.cfg.vocab_size == runner.vocab_size
    assert "no trained draft head" in caplog.text
