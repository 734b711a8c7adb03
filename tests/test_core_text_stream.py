"""TextStream: chunks that add up to the decoding of all ids, with stop strings, decoded
incrementally (a split is kept only where the tokenizer decodes the same apart as together)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.target import load_model_and_tokenizer
from specdec.text_stream import TextStream


class ByteTokenizer:
    """Id = one UTF-8 byte (ids >= 256 are special and skipped): a split inside a multi-byte
    character decodes to replacement characters on both sides."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class WordTokenizer:
    """SentencePiece-like: even ids start a word ("▁w"), odd ids continue one; a decode drops the
    leading space of its first word, so it cannot be split before a word start."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join((" w" if i % 2 == 0 else "x") + str(i) for i in ids).lstrip(" ")


def stream(tokenizer, ids: list[int], steps: list[int], stops=(), window: int = 4) -> tuple[str, TextStream, bool]:
    """Feed ids in chunks of the given sizes; return the concatenated output."""
    ts = TextStream(tokenizer, list(stops), window=window)
    out, at, hit = [], 0, False
    for i, size in enumerate(steps):
        chunk = ids[at : at + size]
        at += size
        text, hit = ts.add(chunk, final=at >= len(ids) or i == len(steps) - 1)
        out.append(text)
        if hit or at >= len(ids):
            break
    return "".join(out), ts, hit


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.sampled_from([0x41, 0x20, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 300]), min_size=1, max_size=120),
    steps=st.lists(st.integers(1, 7), min_size=120, max_size=120),
)
def test_byte_level_chunks_add_up_to_the_whole_decoding(ids, steps):
    out, ts, _ = stream(ByteTokenizer(), ids, steps)
    assert out == ByteTokenizer().decode(ids) == ts.text
    assert ts.base_text == ByteTokenizer().decode(ids[: ts.base])


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 40), min_size=1, max_size=150), steps=st.lists(st.integers(1, 5), min_size=150, max_size=150))
def test_a_tokenizer_that_drops_leading_spaces_is_split_only_inside_words(ids, steps):
    out, ts, _ = stream(WordTokenizer(), ids, steps)
    assert out == WordTokenizer().decode(ids)
    assert ts.base == 0 or ids[ts.base] % 2 == 1  # never split before a word start


def test_long_answers_decode_a_bounded_window():
    ids = [0x41 + i % 26 for i in range(2000)]
    decoded: list[int] = []

    class Counting(ByteTokenizer):
        def decode(self, ids, skip_special_tokens: bool = True) -> str:
            decoded.append(len(ids))
            return super().decode(ids)

    out, ts, _ = stream(Counting(), ids, [3] * 700, window=64)
    assert out == ByteTokenizer().decode(ids)
    assert ts.base >= 2000 - 2 * 64 and max(decoded) <= 2 * 64 + 3


def test_a_stop_string_across_a_split_is_found():
    text = "abcdefghij" * 20 + "STOP" + "tail"
    ids = list(text.encode())
    out, ts, hit = stream(ByteTokenizer(), ids, [1] * len(ids), stops=["STOP"])
    assert hit and out == "abcdefghij" * 20 and ts.base > 0


@pytest.mark.real
def test_the_default_tokenizer_streams_exactly():
    tokenizer = load_model_and_tokenizer(None, torch.float32, "cpu")[1]
    text = "Grüße aus Zürich — 東京 🙂 naïve café.\n" * 40 + "def f(x):\n    return x ** 2  # ok\n" * 20
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out, ts, _ = stream(tokenizer, ids, [1, 2, 3, 5] * len(ids), window=16)
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
    assert ts.base > len(ids) // 2  # the split moved along
