"""The drafter interface and its in-process implementation over a draft head (EAGLE-2 trees,
with lookup chains from the sequence's own text among the candidates: `specdec.lookup`).

A session mirrors one sequence. Its invariant: it knows tokens T[0..N] and the target's
features F[0..N-1]: every token but the last, whose feature the target has not computed yet.
That last token is the root of the next tree. `open` starts with the prompt plus the first
generated token and the prompt's features; `extend` adds the tokens committed by a round
(accepted + bonus) with the features of the tokens before them (old root + accepted). The
head reads features lazily, in the next round that runs it (a round whose tree is a likely
lookup chain alone skips the head); the first time, only the last `TreeConfig.head_context`
of them, while lookup chains search every token.

The gRPC client in services/ implements the same two classes, so the decode loop cannot tell
an embedded drafter from a remote one.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch

from specdec.config import ConfigError, TreeConfig
from specdec.head import CONFIG_FILE, DraftHead, HeadConfig
from specdec.lookup import NgramIndex
from specdec.target import TargetRunner
from specdec.tree import CandidateTree, DraftTree

log = logging.getLogger(__name__)


class DrafterUnavailable(RuntimeError):
    """The drafter cannot answer (remote down, deadline passed): decode without it for now."""


class DraftSession(ABC):
    """One sequence's drafting state."""

    @abstractmethod
    def extend(self, token_ids: Sequence[int], features: torch.Tensor) -> None:
        """Add committed tokens and the target features of the tokens before them."""

    @abstractmethod
    def propose(self) -> DraftTree:
        """A tree rooted at the last known token."""

    @abstractmethod
    def close(self) -> None:
        """Free the session's resources; further calls are errors."""

    @property
    def backlog(self) -> int:
        """Committed tokens whose features the drafter has not read yet (it reads them in the
        next `propose`, which costs more the longer the backlog); 0 where it cannot tell."""
        return 0

    def lookup(self) -> DraftTree | None:
        """A tree of drafts found without the head (a lookup chain: what followed an earlier
        occurrence of the current suffix), cheap enough to ask for every round; None when
        there is none or the drafter has no such source."""
        return None


class Drafter(ABC):
    """Creates sessions; one per sequence being generated."""

    @property
    @abstractmethod
    def budget(self) -> int:
        """Most nodes a proposed tree can have (the verifier reserves that many positions)."""

    @abstractmethod
    def open(self, token_ids: Sequence[int], features: torch.Tensor) -> DraftSession:
        """token_ids: prompt + first generated token; features: the target's features of the
        tokens before the root, [len(token_ids) - 1, d], or of only the last F of them where the
        drafter reads no more (`HeadDrafter`: at least `TreeConfig.head_context`)."""

    def state(self) -> str:
        """What a readiness probe reports: an in-process drafter is always 'embedded'."""
        return "embedded"

    def close(self) -> None:
        """Release what the drafter holds beyond its sessions (a connection); nothing by default."""


class HeadDrafter(Drafter):
    """Drafts with a `DraftHead` in this process (on packed or Q8_0 weights, see `DraftHead.quantize_for_inference`)."""

    def __init__(self, head: DraftHead, tree: TreeConfig):
        self.head = head.eval().requires_grad_(False).quantize_for_inference()
        self.tree = tree

    @property
    def budget(self) -> int:
        return self.tree.total_tokens

    def open(self, token_ids: Sequence[int], features: torch.Tensor) -> "HeadDraftSession":
        skipped = len(token_ids) - 1 - features.shape[0]
        if skipped < 0:
            raise ValueError(f"{len(token_ids)} tokens have at most {len(token_ids) - 1} features before the root, got {features.shape[0]}")
        session = HeadDraftSession(self.head, self.tree, skipped)
        session.index.extend(token_ids[: skipped + 1])
        session.extend(token_ids[skipped + 1 :], features)
        return session


class HeadDraftSession(DraftSession):
    def __init__(self, head: DraftHead, tree: TreeConfig, skipped: int = 0):
        self.head, self.tree = head, tree
        param = head.fc.weight
        self.device, self.dtype = param.device, param.dtype
        self.cache = head.new_draft_cache()
        self.index = NgramIndex()
        self._pending: list[torch.Tensor] = []
        # Leading tokens whose (feature, next token) pairs the head never read (not sent, or
        # beyond head_context): the head's cache slot i holds the pair of token i + skipped.
        self._skipped = skipped
        self._root_hidden: torch.Tensor | None = None
        self._root_feature: torch.Tensor | None = None
        self.closed = False

    @property
    def backlog(self) -> int:
        return sum(f.shape[0] for f in self._pending)

    @property
    def tokens(self) -> list[int]:
        """Every token the session knows (the n-gram index holds them)."""
        return self.index.tokens

    def extend(self, token_ids: Sequence[int], features: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError("session is closed")
        if features.shape[0] != len(token_ids):
            raise ValueError(f"{len(token_ids)} tokens need as many features, got {features.shape[0]}")
        self.index.extend(token_ids)
        if len(token_ids):
            self._pending.append(features.to(self.device, self.dtype))

    @torch.inference_mode()
    def _consume_pending(self) -> None:
        """Run the head over the (feature, next token) pairs not seen yet, caching their KV; on
        the first run, over the last `head_context` of them. Positions count from the first
        pair read: rotary attention depends only on the distance between positions."""
        if not self._pending:
            return
        feats = torch.cat(self._pending)
        start = self.cache.length
        if not start and 0 < self.tree.head_context < feats.shape[0]:
            cut = feats.shape[0] - self.tree.head_context
            self._skipped += cut
            feats = feats[cut:]
        count = feats.shape[0]
        first = self._skipped + start
        nxt = torch.tensor(self.tokens[first + 1 : first + 1 + count], device=self.device)
        positions = torch.arange(start, start + count, device=self.device)
        hidden, feature = self.head.step(feats, nxt, positions, None, self.cache)
        self._root_hidden, self._root_feature = hidden[-1], feature[-1]
        self._pending = []

    def lookup(self) -> DraftTree | None:
        if self.closed:
            raise RuntimeError("session is closed")
        cands, _ = self._chain()
        return cands.select(self.tree.total_tokens, self._min_score) if len(cands.tokens) > 1 else None

    @property
    def _min_score(self) -> float:
        return math.log(self.tree.min_prob) if self.tree.min_prob > 0 else -math.inf

    def _chain(self) -> tuple[CandidateTree, bool]:
        """Candidates holding the root and the lookup chain (if any), and whether the chain is
        likely enough to be proposed without the head."""
        cfg = self.tree
        cands = CandidateTree([self.tokens[-1]])
        chain = self.index.lookup(cfg.lookup_tokens) if cfg.lookup_tokens else None
        if chain is None:
            return cands, False
        node = 0
        for token, score in zip(chain.tokens, chain.log_probs):
            node = cands.add(node, token, score)
        return cands, chain.log_probs[0] >= math.log(cfg.lookup_alone)

    @torch.inference_mode()
    def propose(self) -> DraftTree:
        if self.closed:
            raise RuntimeError("session is closed")
        cfg, head = self.tree, self.head
        min_score = self._min_score
        cands, alone = self._chain()
        if alone:
            return cands.select(cfg.total_tokens, min_score)
        self._consume_pending()
        committed = self.cache.length
        k = cfg.top_k
        # Depth 1: children of the root from the last committed pair's output.
        logp = torch.log_softmax(head.logits(self._root_hidden).float(), -1)
        top = torch.topk(logp, min(k, logp.shape[-1]))
        frontier = [cands.add(0, t, v) for t, v in zip(head.d2t[top.indices].tolist(), top.values.tolist())]
        frontier_inputs = self._root_feature.expand(len(frontier), -1)
        # Draft-cache slot of each expanded node (to build ancestor masks).
        slot: dict[int, int] = {}
        for depth in range(2, cfg.depth + 1):
            # A frontier node that can no longer be selected (below min_prob, or below the
            # best total_tokens - 1 candidates so far, a strong lookup chain's included) has
            # no child that could be: expanding it would only cost time. The tree is unchanged.
            bar = cands.bar(cfg.total_tokens, min_score)
            live = [j for j, node in enumerate(frontier) if cands.scores[node] >= bar]
            if not live:
                break
            if len(live) < len(frontier):
                frontier, frontier_inputs = [frontier[j] for j in live], frontier_inputs[live]
            base = self.cache.length
            for j, node in enumerate(frontier):
                slot[node] = base + j
            mask = torch.zeros(len(frontier), base + len(frontier), dtype=torch.bool, device=self.device)
            mask[:, :committed] = True
            for j, node in enumerate(frontier):
                a = node
                while a != 0:
                    mask[j, slot[a]] = True
                    a = cands.parents[a]
            ids = torch.tensor([cands.tokens[n] for n in frontier], device=self.device)
            positions = torch.full((len(frontier),), committed + depth - 2, device=self.device)
            hidden, feature = head.step(frontier_inputs, ids, positions, mask, self.cache)
            logp = torch.log_softmax(head.logits(hidden).float(), -1)
            top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            kk = top.indices.shape[-1]
            children = [
                cands.add(parent, token, cands.scores[parent] + value)
                for parent, row_tokens, row_values in zip(frontier, head.d2t[top.indices].tolist(), top.values.tolist())
                for token, value in zip(row_tokens, row_values)
            ]
            best = sorted(range(len(children)), key=lambda j: (-cands.scores[children[j]], j))[:k]
            frontier = [children[j] for j in best]
            frontier_inputs = feature[[j // kk for j in best]]
        self.cache.truncate(committed)
        return cands.select(cfg.total_tokens, min_score)

    def close(self) -> None:
        self.closed = True
        self.cache = self.head.new_draft_cache()
        self._pending = []


DEFAULT_HEAD = "smollm2-135m-instruct-fspad"


def default_head_dir() -> Path:
    """The FSPAD head shipped in the repository for the default target."""
    return Path(__file__).resolve().parent.parent / "heads" / DEFAULT_HEAD


def _default_head_for(runner: TargetRunner) -> str:
    config = default_head_dir() / CONFIG_FILE
    if config.is_file() and json.loads(config.read_text()).get("target") == runner.name:
        return str(default_head_dir())
    log.warning("no trained draft head for target %s: using a random head (lossless, but slow); pass --head", runner.name)
    return "random"


def load_head_drafter(runner: TargetRunner, head: str | None, tree: TreeConfig, seed: int = 0) -> HeadDrafter:
    """A drafter from a saved head directory, "random" (a randomly initialised FSPAD head:
    lossless but slow), or None for the shipped default head when the runner is the target it
    was trained for (random otherwise, with a warning)."""
    if head is None:
        head = _default_head_for(runner)
    if head == "random":
        torch.manual_seed(seed)
        cfg = HeadConfig.for_target(runner.config, "fspad", target=runner.name)
        module = DraftHead(cfg, runner.embed_tokens, runner.lm_head.weight).to(runner.device, runner.dtype)
    else:
        module = load_head(runner, head)
    return HeadDrafter(module, tree)


def load_head(runner: TargetRunner, path: str | Path) -> DraftHead:
    """A saved head directory bound to `runner`'s embedding and LM head; a clear error when the
    path is not a directory or the head was trained for another target shape."""
    if not Path(path).is_dir():
        raise ConfigError(f"head path {str(path)!r} is not a directory")
    return DraftHead.load(path, runner.embed_tokens, runner.lm_head.weight, runner.config)
