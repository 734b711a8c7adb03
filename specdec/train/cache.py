"""The feature cache: shards of token ids, loss masks and float16 target features, plus a
meta.json that ties the cache to the target that produced it (refused for any other target)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdec.config import ConfigError
from specdec.target import TargetRunner

META_FILE = "meta.json"
VOCAB_FILE = "vocab.safetensors"


@dataclass(frozen=True)
class CacheMeta:
    """Identity of a feature cache: which target, which data, how it was cut into shards."""

    target: str
    fingerprint: str
    hidden_size: int
    vocab_size: int
    data: str
    max_len: int
    shard_size: int


@dataclass
class Sequence:
    """One conversation: ids [L], mask [L] (True on assistant tokens), features [L, d] float16."""

    ids: torch.Tensor
    mask: torch.Tensor
    features: torch.Tensor


def target_fingerprint(runner: TargetRunner) -> str:
    """A hash of the target's shapes, final norm and LM head: equal for the same weights."""
    h = hashlib.sha256()
    cfg = runner.config
    h.update(json.dumps([cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, runner.vocab_size]).encode())
    for t in (runner.model.model.norm.weight, runner.lm_head.weight):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_meta(runner: TargetRunner, data: str, max_len: int, shard_size: int) -> CacheMeta:
    return CacheMeta(runner.name, target_fingerprint(runner), runner.hidden_size, runner.vocab_size, data, max_len, shard_size)


def read_meta(directory: str | Path) -> CacheMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} is not a feature cache (no {META_FILE}); run `specdec train extract` first")
    return CacheMeta(**json.loads(path.read_text()))


def check_target(meta: CacheMeta, runner: TargetRunner, directory: str | Path) -> None:
    """Refuse a cache made by another target: its features would teach the wrong model."""
    mine = target_fingerprint(runner)
    if meta.fingerprint != mine:
        raise ConfigError(
            f"feature cache {directory} was made by target {meta.target!r} (fingerprint {meta.fingerprint}); "
            f"the loaded target {runner.name!r} has fingerprint {mine}: extract again for this target"
        )


def write_meta(directory: str | Path, meta: CacheMeta) -> None:
    """Create the cache's meta.json, or check that an existing one describes the same cache."""
    path = Path(directory) / META_FILE
    if path.is_file():
        old = read_meta(directory)
        if old.fingerprint != meta.fingerprint:
            raise ConfigError(
                f"{directory} holds features of target {old.target!r} (fingerprint {old.fingerprint}), "
                f"not of {meta.target!r} ({meta.fingerprint}): use another --out folder"
            )
        if old != meta:
            raise ConfigError(f"{directory} was extracted with other settings ({old}); use another --out folder")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(meta), indent=2))


def shard_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"shard-{index:05d}.safetensors"


def shard_size_on_disk(directory: str | Path, index: int) -> int:
    """How many sequences shard `index` holds (0 if it does not exist)."""
    from safetensors import safe_open

    path = shard_path(directory, index)
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as f:
        return f.get_slice("lengths").get_shape()[0]


def save_shard(directory: str | Path, index: int, sequences: list[Sequence]) -> None:
    """Write one shard atomically (a killed run never leaves a half-written shard)."""
    tensors = {
        "ids": torch.cat([s.ids for s in sequences]).int(),
        "mask": torch.cat([s.mask for s in sequences]).to(torch.uint8),
        "features": torch.cat([s.features for s in sequences]).half(),
        "lengths": torch.tensor([len(s.ids) for s in sequences], dtype=torch.int64),
    }
    final = shard_path(directory, index)
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    tmp.replace(final)


def load_sequences(directory: str | Path, runner: TargetRunner | None = None) -> list[Sequence]:
    """Every stored sequence, in extraction order; with a runner, refuses another target's cache."""
    meta = read_meta(directory)
    if runner is not None:
        check_target(meta, runner, directory)
    out = []
    for path in sorted(Path(directory).glob("shard-*.safetensors")):
        t = load_file(path)
        starts = torch.cumsum(t["lengths"], 0) - t["lengths"]
        for s, n in zip(starts.tolist(), t["lengths"].tolist()):
            out.append(Sequence(t["ids"][s : s + n].long(), t["mask"][s : s + n].bool(), t["features"][s : s + n]))
    if not out:
        raise ConfigError(f"feature cache {directory} has no shards yet")
    return out
