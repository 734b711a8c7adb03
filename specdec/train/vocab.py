"""The draft vocabulary: the most frequent target-output tokens and the d2t mapping to target ids."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdec.config import ConfigError
from specdec.train.cache import Sequence


def count_tokens(sequences: list[Sequence], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs among the assistant tokens of `sequences`."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in sequences:
        counts += torch.bincount(s.ids[s.mask], minlength=vocab_size)
    return counts


def choose_vocab(
    sequences: list[Sequence],
    size: int,
    vocab_size: int,
    always: tuple[int, ...] = (),
    extra: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The `size` most frequent tokens among assistant tokens (plus `always`, e.g. EOS), as an
    ascending d2t tensor, and the share of assistant tokens they cover. `extra` adds counts
    from text that has no features (e.g. more conversations, only tokenized). `candidates`
    (target ids) limits the choice to them, e.g. to shrink a trained head's vocabulary."""
    pool = vocab_size if candidates is None else candidates.numel()
    if not 0 < size <= pool:
        raise ConfigError(f"draft vocabulary size must be in 1..{pool}, got {size}")
    counts = count_tokens(sequences, vocab_size)
    if extra is not None:
        counts += extra
    ranked = counts.clone()
    ranked[list(always)] = counts.max() + 1
    if candidates is not None:
        excluded = torch.ones(vocab_size, dtype=torch.bool)
        excluded[candidates] = False
        ranked[excluded] = -1
    chosen = torch.topk(ranked, size).indices.sort().values
    total = int(counts.sum())
    return chosen, (float(counts[chosen].sum()) / total if total else 0.0)


def save_vocab(path: str | Path, d2t: torch.Tensor, fingerprint: str, coverage: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"d2t": d2t.long().contiguous()}, path, metadata={"fingerprint": fingerprint, "coverage": f"{coverage:.6f}"})


def load_vocab(path: str | Path, fingerprint: str, vocab_size: int) -> torch.Tensor:
    """d2t from a vocab file; refuses one made for another target."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"draft vocabulary {path} does not exist; run `specdec train vocab` first")
    with safe_open(str(path), "pt") as f:
        made_for = (f.metadata() or {}).get("fingerprint")
    if made_for != fingerprint:
        raise ConfigError(f"draft vocabulary {path} was made for target fingerprint {made_for}, not {fingerprint}")
    d2t = load_file(path)["d2t"]
    if int(d2t.max()) >= vocab_size:
        raise ConfigError(f"draft vocabulary {path} has ids beyond the target's vocabulary ({vocab_size})")
    return d2t
