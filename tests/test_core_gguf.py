"""Linear layers on GGUF blocks: the kernel equals the float32 product of the decoded weights,
rows are matched exactly or refused, and the default target runs on its own 4-bit blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.gguf_linear import (
    GGUFLinear,
    QuantWeight,
    build_kernel,
    has_vnni,
    kernel,
    kernels_enabled,
    match_rows,
    quantize_linears,
    quantize_q8_0,
    read_gguf_weights,
)
from specdec.packed import PackedLinear
from tests.tiny import tiny_head, tiny_runner

pytestmark = pytest.mark.skipif(
    kernel() is None, reason="no AVX2 CPU or no C++ compiler: the target stays float32"
)


def random_quant(n: int, k: int, q4: bool, seed: int = 0) -> QuantWeight:
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float()
    if q4:
        qs = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        m = (-torch.rand(n, k // 32, generator=gen) * 0.1).half().float()
        return QuantWeight(qs, d, m, True)
    qs = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    return QuantWeight(qs, d, torch.empty(0), False)


@pytest.mark.parametrize("q4", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40])
def test_kernel_equals_the_float32_product_of_the_decoded_weights(q4, rows):
    quant = random_quant(72, 96, q4, seed=rows)
    weight = quant.dequantize()
    layer = GGUFLinear(quant, PackedLinear(weight), max_rows=16)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, weight), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x[None]), F.linear(x, weight)[None], atol=2e-5, rtol=1e-5)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: per block of 32, to multiples of max|x| / 127."""
    blocks = x.view(*x.shape[:-1], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.where(step > 0, blocks / step, 0.0).round() * step).view_as(x)


@pytest.mark.parametrize("q4", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_int8_activations_err_by_at_most_their_rounding(q4, rows):
    """x rounded to int8 per block of 32 moves each element by at most half its block's step
    d = max|x| / 127, so |y - x @ W.T| <= sum over blocks of d/2 * sum |w| (plus float slack)."""
    quant = random_quant(40, 128, q4, seed=rows)
    weight = quant.dequantize()
    x = torch.randn(rows, 128)
    layer = GGUFLinear(quant, PackedLinear(weight), int8_activations=True)
    with torch.inference_mode():
        y = layer(x)
    step = x.view(rows, 4, 32).abs().amax(-1) / 127
    bound = (step[:, None, :] / 2 * weight.abs().view(40, 4, 32).sum(-1)[None]).sum(-1)
    error = (y - F.linear(x, weight)).abs()
    assert (error <= bound + 1e-4).all()
    assert error.max() > 0  # really quantized


@pytest.mark.parametrize("q4", [True, False])
@pytest.mark.parametrize("k", [32, 96, 128, 576])  # odd and even block counts
def test_int8_products_are_exact_on_the_rounded_input_and_independent_of_other_rows(q4, k):
    """The kernel's integer sums are exact: its result is the float64 product of the rounded x
    and the decoded weights up to float32 rounding; and a row's result is the same bits
    whether it comes alone or with up to 16 others (rows go through tiles of 1 to 8)."""
    quant = random_quant(70, k, q4, seed=k)
    x = torch.randn(17, k)
    ext = kernel()
    with torch.inference_mode():
        y = ext.gguf_matmul(x, quant.qs, quant.d, quant.m, q4, True)
        exact = quantize_activations(x).double() @ quant.dequantize().double().T
        torch.testing.assert_close(y.double(), exact, atol=1e-5, rtol=1e-5)
        for rows in (1, 2, 5, 8, 9, 16):
            part = ext.gguf_matmul(x[:rows].contiguous(), quant.qs, quant.d, quant.m, q4, True)
            assert torch.equal(part, y[:rows])


@pytest.mark.skipif(not has_vnni(), reason="no AVX-512 VNNI here: only the AVX2 build exists")
@pytest.mark.parametrize("int8", [True, False])
def test_the_avx2_build_gives_the_avx512_builds_products_bit_for_bit(int8):
    """Served models must decode the same on every CPU: the AVX2 build makes the same integer
    sums and the same float operations as the AVX-512 one, whose float products put two rows of
    W in one register (gguf_blocks.h), for any number of rows of x and of W (odd ones too)."""
    avx2, vnni = build_kernel(False), build_kernel(True)
    assert avx2 is not None and vnni is not None and avx2 is not vnni
    for q4 in (True, False):
        for k in (96, 576):
            quant = random_quant(131, k, q4, seed=k)
            x = torch.randn(19, k)
            for rows in (1, 2, 3, 8, 11, 19):
                args = (x[:rows].contiguous(), quant.qs, quant.d, quant.m, q4, int8)
                assert torch.equal(avx2.gguf_matmul(*args), vnni.gguf_matmul(*args))


def near_copies(n: int, k: int, seed: int) -> QuantWeight:
    """A Q8_0 weight whose rows are row 0 with one weight nudged one step toward zero (logits a
    hair apart, below row 0's for x = row 0), and a few exact copies of row 0 (tied logits)."""
    quant = random_quant(n, k, False, seed)
    qs, d = quant.qs.clone(), quant.d.clone()
    gen = torch.Generator().manual_seed(seed)
    for row in range(1, n):
        qs[row], d[row] = qs[0], d[0]
        if row % 7:
            col = int(torch.randint(0, k, (1,), generator=gen))
            v = int(qs[row, col].view(torch.int8))
            qs[row, col] = (v - (v > 0) + (v < 0)) % 256
    return QuantWeight(qs.contiguous(), d.contiguous(), torch.empty(0), False)


@pytest.mark.parametrize("k", [96, 576])
@pytest.mark.parametrize("rows", [1, 3, 6, 16])
@pytest.mark.parametrize("weights", ["random", "near copies"])
def test_screened_greedy_tokens_are_the_float32_products_argmax(k, rows, weights):
    """GGUFLinear.argmax (int8 screen, float32 recompute) gives exactly the full product's argmax,
    the lowest index among tied rows included, on both builds."""
    quant = random_quant(1000, k, False, seed=k + rows) if weights == "random" else near_copies(200, k, seed=k + rows)
    layer = GGUFLinear(quant, PackedLinear(quant.dequantize()), max_rows=16)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen)
    if weights == "near copies":
        x[0] = quant.dequantize()[0]  # row 0 of x: every copy of W's row 0 ties for the maximum
    with torch.inference_mode():
        expected = layer(x).argmax(-1)
        assert torch.equal(layer.argmax(x), expected)
        for build in (build_kernel(False), build_kernel(True)):
            if build is not None:
                found = build.gguf_argmax(x.contiguous(), quant.qs, quant.d, quant.m, False, layer._wnorm)
                assert torch.equal(found, expected)
    if weights == "near copies":
        assert int(expected[0]) == 0


def test_greedy_tokens_fall_back_to_the_full_product_where_they_cannot_screen():
    """A non-finite input, 4-bit weights and int8 activations take the full product's argmax."""
    q8 = random_quant(300, 96, False, seed=5)
    x = torch.randn(3, 96)
    x[1, 4] = float("inf")
    with torch.inference_mode():
        for layer in (
            GGUFLinear(q8, PackedLinear(q8.dequantize())),
            GGUFLinear(q8, PackedLinear(q8.dequantize()), int8_activations=True),
            GGUFLinear(random_quant(300, 96, True, seed=5), PackedLinear(random_quant(300, 96, True, seed=5).dequantize())),
        ):
            assert torch.equal(layer.argmax(x), layer(x).argmax(-1))


def test_decoding_follows_ggml_nibble_order_and_formulas():
    qs = torch.zeros(1, 16, dtype=torch.uint8)
    qs[0, 0] = 0x3 | (0xA << 4)  # element 0 is the low nibble, element 16 the high one
    quant = QuantWeight(qs, torch.tensor([[0.5]]), torch.tensor([[-1.0]]), True)
    w = quant.dequantize()[0]
    assert w[0] == 0.5 * 3 - 1 and w[16] == 0.5 * 10 - 1 and w[1] == -1.0
    q8 = QuantWeight(torch.tensor([[255] + [2] * 31], dtype=torch.uint8), torch.tensor([[0.25]]), torch.empty(0), False)
    assert q8.dequantize()[0, 0] == -0.25 and q8.dequantize()[0, 1] == 0.5


def test_bias_is_added():
    quant = random_quant(8, 32, True)
    bias = torch.randn(8)
    layer = GGUFLinear(quant, PackedLinear(quant.dequantize(), bias))
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), F.linear(x, quant.dequantize(), bias), atol=2e-5, rtol=1e-5)


def test_match_rows_finds_the_row_order_or_refuses():
    quant = random_quant(16, 64, True)
    weight = quant.dequantize()
    assert match_rows(quant, weight) is quant
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    matched = match_rows(quant, weight[order])
    assert matched is not None and torch.equal(matched.dequantize(), weight[order])
    changed = weight.clone()
    changed[3, 5] += 1e-3
    assert match_rows(quant, changed) is None
    assert match_rows(quant, weight[:, :32]) is None


def test_fused_weights_stack_rows():
    a, b = random_quant(8, 64, True, 1), random_quant(4, 64, True, 2)
    fused = QuantWeight.cat([a, b])
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError):
        QuantWeight.cat([a, random_quant(4, 64, False)])


def test_q8_0_quantization_error_is_within_half_a_step():
    weight = torch.randn(24, 96)
    quant = quantize_q8_0(weight)
    step = quant.d.repeat_interleave(32, dim=1)
    assert ((quant.dequantize() - weight).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(quantize_q8_0(torch.zeros(2, 32)).dequantize(), torch.zeros(2, 32))


def test_quantized_head_keeps_its_state_dict_and_proposes_similar_logits():
    runner = tiny_runner()
    head = tiny_head(runner).eval()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    feats, tokens, positions = torch.randn(5, 32), torch.arange(5), torch.arange(5)
    with torch.inference_mode():
        reference = head.logits(head(feats, tokens, positions)[0])
        head.quantize_for_inference()
        quantized = head.logits(head(feats, tokens, positions)[0])
    assert isinstance(head.fc, GGUFLinear) and isinstance(head._packed_lm_head[0], GGUFLinear)
    assert head.state_dict().keys() == before.keys()
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(quantized, reference, atol=0.05, rtol=0.05)
    assert quantize_linears(head) == 0  # already quantized: nothing to do


def test_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("SPECDEC_GGUF_KERNELS", "0")
    assert not kernels_enabled() and kernel() is None
    head = tiny_head(tiny_runner())
    assert quantize_linears(head) == 0


@pytest.mark.real
def test_default_target_runs_on_its_own_gguf_blocks():
    from specdec.target import TargetRunner, default_gguf_path
    from specdec.tree import DraftTree

    runner = TargetRunner.load()
    layers = runner.lean.layers
    assert all(isinstance(getattr(layer, name), GGUFLinear) for layer in layers for name in ("qkv", "o", "gate_up", "down"))
    assert isinstance(runner.lean.lm_head, GGUFLinear) and runner.lean._stack is not None
    # Every GGUF matrix decodes to exactly the float32 weight transformers dequantized.
    weights = read_gguf_weights(default_gguf_path())
    assert torch.equal(layers[0].qkv.quant.dequantize(), layers[0].qkv.weight)
    assert torch.equal(runner.lean.lm_head.quant.dequantize(), runner.model.lm_head.weight)
    assert len(weights) == 7 * len(layers) + 1
    ids = runner.encode("Name three colours.", chat=True)
    with torch.inference_mode():
        reference = runner.model(input_ids=torch.tensor([ids])).logits[0, -1]
        state = runner.new_state()
        runner.prefill(state, ids[:-1])
        logits, _ = runner.forward_tree(state, DraftTree.single(ids[-1]))
    torch.testing.assert_close(logits[0], reference, atol=1e-3, rtol=1e-4)


@pytest.mark.real
@pytest.mark.parametrize("prompt", ["Write a haiku about the sea.", "What is 17 times 23? Explain step by step."])
def test_default_target_decodes_the_same_tokens_on_gguf_blocks_as_on_float32(monkeypatch, prompt):
    """Plain greedy decoding on the 4-bit blocks equals decoding on the dequantized float32
    weights token for token (a difference is allowed only at a float near-tie, and counted)."""
    from specdec.config import SamplingParams, StopConfig
    from specdec.generate import Generation
    from specdec.target import TargetRunner

    def decode(runner: TargetRunner) -> list[int]:
        generation = Generation(runner, runner.encode(prompt, chat=True), SamplingParams(), StopConfig(max_new_tokens=48))
        list(generation)
        return generation.token_ids

    quantized = TargetRunner.load()
    monkeypatch.setenv("SPECDEC_GGUF_KERNELS", "0")
    plain = TargetRunner.load()
    assert isinstance(quantized.lean.lm_head, GGUFLinear) and not isinstance(plain.lean.lm_head, GGUFLinear)
    a, b = decode(quantized), decode(plain)
    if a != b:
        at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        ids = quantized.encode(prompt, chat=True) + a[:at]
        with torch.inference_mode():
            top2 = torch.topk(plain.model(input_ids=torch.tensor([ids])).logits[0, -1], 2).values
        assert float(top2[0] - top2[1]) < 1e-4, f"tokens differ at {at} without a near-tie"
