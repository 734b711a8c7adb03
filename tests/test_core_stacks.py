"""The C++ forwards on GGUF blocks, on tiny models. The target's decoder stack
(`kernels/decoder.cpp`) matches the Python forward on the same weights, and a token's logits
inside a tree are bit-for-bit those of a one-token step, so greedy speculative decoding equals
plain decoding exactly. The draft head's forward (`kernels/draft_head.cpp`) matches the head
module on its Q8_0 weights for every variant."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.gguf_linear import kernel
from specdec.tree import DraftTree
from tests.test_core_greedy import decode, prompt_for
from tests.test_core_target import VOCAB, path_to, random_tree
from tests.tiny import tiny_drafter, tiny_gguf_runner, tiny_head, tiny_runner

pytestmark = pytest.mark.skipif(kernel() is None, reason="no AVX2 CPU or no C++ compiler: no decoder stack")


def run(runner, prompt: list[int], tree: DraftTree, stack: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompt` and verify `tree` on a fresh state, with or without the C++ stack."""
    saved = runner.lean._stack
    runner.lean._stack = saved if stack else None
    try:
        state = runner.new_state(capacity=8)  # small, so the cache also grows mid-test
        runner.prefill(state, prompt)
        return runner.forward_tree(state, tree)
    finally:
        runner.lean._stack = saved


def test_the_gguf_runner_uses_the_stack():
    runner = tiny_gguf_runner()
    assert runner.lean._stack is not None and len(runner.lean._stack.norms) == 2 * len(runner.lean.layers)
    assert runner.lean._stack.q4.count(True) == 2 * len(runner.lean.layers)  # q/k/v fused, down


@pytest.mark.parametrize("seed", range(4))
def test_stack_matches_the_python_forward(seed):
    rng = random.Random(seed)
    runner = tiny_gguf_runner(seed)
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 14))]
    for tree in (DraftTree.single(prompt[-1]), random_tree(rng, prompt[-1], 1 + seed * 4)):
        logits, features = run(runner, prompt[:-1], tree, stack=True)
        ref_logits, ref_features = run(runner, prompt[:-1], tree, stack=False)
        torch.testing.assert_close(features, ref_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-5)


def test_stack_causal_chunk_after_a_prefix_matches_the_python_forward():
    """A multi-token input without a mask (a prompt continued in chunks) is causal."""
    runner = tiny_gguf_runner(5)
    out = {}
    for stack in (True, False):
        runner.lean._stack, saved = (runner.lean._stack if stack else None), runner.lean._stack
        state = runner.new_state()
        runner.prefill(state, list(range(6)))
        with torch.inference_mode():
            out[stack] = runner.lean(torch.arange(10, 17), torch.arange(6, 13), state.cache, 6, None)
        runner.lean._stack = saved
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


def test_stack_with_int8_activations_matches_the_python_forward_on_them():
    """The int8 stack and the per-layer Python path over the same int8 products agree; both
    differ from the float32-activation forward by the activations' rounding only."""
    rng = random.Random(7)
    runner = tiny_gguf_runner(7, int8_activations=True)
    prompt = [rng.randrange(VOCAB) for _ in range(9)]
    tree = random_tree(rng, prompt[-1], 6)
    logits, features = run(runner, prompt[:-1], tree, stack=True)
    ref_logits, ref_features = run(runner, prompt[:-1], tree, stack=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-5)
    float_logits, _ = run(tiny_gguf_runner(7), prompt[:-1], tree, stack=True)
    assert not torch.equal(logits, float_logits)
    torch.testing.assert_close(logits, float_logits, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_tree_rows_equal_one_token_steps_bit_for_bit(seed, int8):
    rng = random.Random(seed)
    runner = tiny_gguf_runner(seed, int8_activations=int8)
    assert runner.lean._stack.int8_activations == int8
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 12))]
    tree = random_tree(rng, prompt[-1], 12)
    logits, features = run(runner, prompt[:-1], tree, stack=True)
    for node in range(len(tree)):
        state = runner.new_state()
        runner.prefill(state, prompt[:-1])
        for i in path_to(tree, node):
            step_logits, step_features = runner.forward_tree(state, DraftTree.single(tree.tokens[i]))
            runner.commit(state, [0])
        assert torch.equal(step_logits[0], logits[node]) and torch.equal(step_features[0], features[node])


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_greedy_speculative_equals_plain_on_the_stack(seed, int8):
    runner = tiny_gguf_runner(seed, int8_activations=int8)
    prompt = prompt_for(seed)
    plain, _ = decode(runner, prompt)
    drafter = tiny_drafter(runner, seed=seed, variant="fspad" if seed % 2 else "eagle2")
    assert drafter.head._stack is not None
    spec, _ = decode(runner, prompt, drafter)
    assert spec.token_ids == plain.token_ids and spec.stats.draft_tokens > 0


@pytest.mark.parametrize(
    "variant, switches",
    [("fspad", {}), ("eagle2", {}), ("fspad", {"feature_sampling": False}), ("fspad", {"partial_alignment": False})],
)
def test_head_step_matches_the_module_forward(variant, switches):
    """A prompt's pairs, then a masked batch of tree nodes on top of them, as a proposal runs."""
    runner = tiny_runner(1)
    head = tiny_head(runner, variant)
    if switches:
        from specdec.head import DraftHead, HeadConfig

        cfg = HeadConfig.for_target(runner.config, variant, target=runner.name, **switches)
        head = DraftHead(cfg, runner.embed_tokens, runner.lm_head.weight)
    head.eval().quantize_for_inference(int8_activations=False)
    stack = head._stack
    assert stack is not None and len(stack.norms) == (3 if head.cfg.feature_sampling else 2)
    gen = torch.Generator().manual_seed(0)
    feats, tokens = torch.randn(9, 32, generator=gen), torch.randint(0, VOCAB, (9,), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[:, 6:] = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    out = {}
    with torch.inference_mode():
        for fused in (True, False):
            head._stack = stack if fused else None
            cache = head.new_draft_cache()
            first = head.step(feats[:6], tokens[:6], torch.arange(6), None, cache)
            second = head.step(feats[6:], tokens[6:], torch.tensor([6, 7, 7]), mask, cache)
            out[fused] = [*first, *second, cache.buffer.data[0, :, :, : cache.length]]
    for fused, plain in zip(out[True], out[False]):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_head_step_without_a_mask_is_causal_after_the_cache():
    """mask=None in a step after cached rows (a proposal feeding the committed pairs): each new
    row sees the cache and the new rows up to itself, in the C++ step and in the module's."""
    runner = tiny_runner(2)
    head = tiny_head(runner, "fspad").eval().quantize_for_inference(int8_activations=False)
    stack = head._stack
    gen = torch.Generator().manual_seed(1)
    feats, tokens = torch.randn(9, 32, generator=gen), torch.randint(0, VOCAB, (9,), generator=gen)
    causal = torch.ones(4, 9, dtype=torch.bool)
    causal[:, 5:] = torch.ones(4, 4, dtype=torch.bool).tril()
    with torch.inference_mode():
        for fused in (True, False):
            head._stack = stack if fused else None
            runs = []
            for mask in (None, causal):
                cache = head.new_draft_cache()
                head.step(feats[:5], tokens[:5], torch.arange(5), None, cache)
                runs.append(head.step(feats[5:], tokens[5:], torch.arange(5, 9), mask, cache))
            whole = head.step(feats, tokens, torch.arange(9), None, head.new_draft_cache())
            for a, b, c in zip(*runs, whole):
                assert torch.equal(a, b)
                torch.testing.assert_close(a, c[5:], atol=1e-5, rtol=1e-5)


def test_head_rotary_table_matches_computed_angles():
    """The drafting step's cos/sin table (grown past its first 512 positions) gives what
    computing them gives."""
    head = tiny_head(tiny_runner(0), "fspad")
    for positions in (torch.tensor([0, 3, 511]), torch.tensor([[700, 2], [1500, 9]])):
        for got, expected in zip(head.attn.rotary_at(positions), head.attn.rotary(positions, torch.float32)):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert head.attn._table[0].shape[0] >= 1501


def test_stack_refuses_bad_arguments():
    runner = tiny_gguf_runner()
    lean, stack = runner.lean, runner.lean._stack
    cache = lean.new_cache(capacity=4)
    x = lean.embed(torch.arange(3))
    cos, sin = lean.cos[:3], lean.sin[:3]
    args = (stack.norms, stack.blocks, stack.q4, lean.heads, lean.kv_heads, lean.scale, stack.eps, stack.int8_activations)
    def call(starts, rows, masks, *rest):
        return stack.kernel.decoder_forward(x.clone(), [cache.data] * len(starts), starts, rows, masks, cos, sin, *rest)

    with pytest.raises(RuntimeError, match="too small"):
        call([2], [3], [None], *args)
    with pytest.raises(RuntimeError, match="mask"):
        call([0], [3], [torch.ones(3, 2, dtype=torch.bool)], *args)
    with pytest.raises(RuntimeError, match="per layer"):
        call([0], [3], [None], stack.norms[:2], *args[1:])
    with pytest.raises(RuntimeError, match="add up"):
        call([0, 0], [1, 1], [None, None], *args)
    with pytest.raises(RuntimeError, match="per sequence"):
        call([0], [3], [None, None], *args)


def test_head_step_with_int8_activations_stays_close_to_float_activations():
    runner = tiny_runner(2)
    feats, tokens = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), torch.arange(5)
    out = {}
    with torch.inference_mode():
        for int8 in (True, False):
            head = tiny_head(runner).eval().quantize_for_inference(int8_activations=int8)
            assert head._stack.int8_activations == int8
            hidden, feature = head.step(feats, tokens, torch.arange(5), None, head.new_draft_cache())
            out[int8] = (head.logits(hidden), feature)
    assert not torch.equal(out[True][0], out[False][0])
    for int8, plain in zip(out[True], out[False]):
        torch.testing.assert_close(int8, plain, atol=0.05, rtol=0.05)
