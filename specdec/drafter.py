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

A batched round asks the drafter once for all of its requests' trees (`Drafter.propose_many`):
the in-process drafter grows them together (`propose_together`: per depth, one head forward
over every session's frontier and one draft LM head product over all their rows).

The gRPC client in services/ implements the same two classes, so the decode loop cannot tell
an embedded drafter from a remote one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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

    def propose_many(self, sessions: Sequence[DraftSession]) -> list[DraftTree | Exception]:
        """Each of `sessions`' proposal (sessions of this drafter), or the exception its
        `propose` raised, in order: one after another here; a drafter that can run them
        together (`HeadDrafter`: one head forward per depth for all) overrides it."""
        out: list[DraftTree | Exception] = []
        for session in sessions:
            try:
                out.append(session.propose())
            except Exception as exc:  # noqa: BLE001 - handed to that session's generation
                out.append(exc)
        return out

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

    def propose_many(self, sessions: Sequence[DraftSession]) -> list[DraftTree | Exception]:
        return propose_together(self.head, self.tree, sessions)  # type: ignore[arg-type]

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
        self._backlog = 0  # rows in _pending
        # Leading tokens whose (feature, next token) pairs the head never read (not sent, or
        # beyond head_context): the head's cache slot i holds the pair of token i + skipped.
        self._skipped = skipped
        self._root_hidden: torch.Tensor | None = None
        self._root_feature: torch.Tensor | None = None
        self.closed = False

    @property
    def backlog(self) -> int:
        return self._backlog

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
            self._backlog += features.shape[0]

    def _pending_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The (feature, next token, position) rows the head has not read yet, and forget them
        as pending; on the first read only the last `head_context` of them. Positions count from
        the first pair read: rotary attention depends only on the distance between positions."""
        if not self._pending:
            return None
        feats = torch.cat(self._pending)
        start = self.cache.length
        if not start and 0 < self.tree.head_context < feats.shape[0]:
            cut = feats.shape[0] - self.tree.head_context
            self._skipped += cut
            feats = feats[cut:]
        count = feats.shape[0]
        first = self._skipped + start
        nxt = torch.tensor(self.tokens[first + 1 : first + 1 + count], device=self.device)
        self._pending, self._backlog = [], 0
        return feats, nxt, torch.arange(start, start + count, device=self.device)

    def lookup(self) -> DraftTree | None:
        if self.closed:
            raise RuntimeError("session is closed")
        cands, _ = self._chain()
        return cands.select(self.tree.total_tokens, _min_score(self.tree)) if len(cands.tokens) > 1 else None


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

    def propose(self) -> DraftTree:
        (tree,) = propose_together(self.head, self.tree, [self])
        if isinstance(tree, Exception):
            raise tree
        return tree

    def close(self) -> None:
        self.closed = True
        self.cache = self.head.new_draft_cache()
        self._pending, self._backlog = [], 0


@dataclass
class _Growth:
    """One session's tree while `propose_together` grows it: the candidates, the frontier
    nodes to expand next and their input features, and each expanded node's draft-cache slot
    (to build ancestor masks)."""

    session: HeadDraftSession
    cands: CandidateTree
    committed: int
    frontier: list[int] = field(default_factory=list)
    inputs: torch.Tensor | None = None
    slots: dict[int, int] = field(default_factory=dict)


@torch.inference_mode()
def propose_together(head: DraftHead, cfg: TreeConfig, sessions: Sequence[HeadDraftSession]) -> list[DraftTree | Exception]:
    """The EAGLE-2 expansion of every session's tree at once: each depth is one head forward
    over all sessions' frontiers (each with its own cache and mask) and one draft LM head
    product over all of their rows, so a batch of requests reads the head's weights once per
    depth instead of once per request. A session's tree is the one it would propose alone: the
    head's rows do not depend on each other (`DraftHead.step_many`), and each session keeps its
    own candidates, frontier and pruning. Returns each session's tree, or the exception that
    session raised (a closed session); a session whose lookup chain is likely enough proposes
    it without the head."""
    min_score = _min_score(cfg)
    out: list[DraftTree | Exception | None] = [None] * len(sessions)
    growing: list[tuple[int, _Growth]] = []
    for i, session in enumerate(sessions):
        if session.closed:
            out[i] = RuntimeError("session is closed")
            continue
        cands, alone = session._chain()
        if alone:
            out[i] = cands.select(cfg.total_tokens, min_score)
        else:
            growing.append((i, _Growth(session, cands, 0)))
    if growing:
        _read_pending(head, [g.session for _, g in growing])
        grown = [g for _, g in growing]
        for g in grown:
            g.committed = g.session.cache.length
        # Depth 1: children of each root from its last committed pair's output.
        roots = torch.stack([g.session._root_hidden for g in grown])
        top = torch.topk(torch.log_softmax(head.logits(roots).float(), -1), min(cfg.top_k, head.d2t.shape[0]), dim=-1)
        for g, tokens, values in zip(grown, head.d2t[top.indices].tolist(), top.values.tolist()):
            g.frontier = [g.cands.add(0, t, v) for t, v in zip(tokens, values)]
            g.inputs = g.session._root_feature.expand(len(g.frontier), -1)
        for depth in range(2, cfg.depth + 1):
            active = [g for g in grown if _prune(g, cfg, min_score)]
            if not active:
                break
            _expand(head, cfg, active, depth)
        for i, g in growing:
            g.session.cache.truncate(g.committed)
            out[i] = g.cands.select(cfg.total_tokens, min_score)
    return out  # type: ignore[return-value]


def _min_score(cfg: TreeConfig) -> float:
    return math.log(cfg.min_prob) if cfg.min_prob > 0 else -math.inf


def _read_pending(head: DraftHead, sessions: Sequence[HeadDraftSession]) -> None:
    """Run the head over each session's pairs not read yet (a round's accepted tokens; the
    prompt's on the first read), caching their KV, and keep the last pair's outputs as the
    root's."""
    work = [(s, pairs) for s in sessions if (pairs := s._pending_pairs()) is not None]
    if not work:
        return
    rows = [pairs[0].shape[0] for _, pairs in work]
    hidden, feature = head.step_many(
        *(torch.cat([pairs[k] for _, pairs in work]) for k in range(3)), [None] * len(work), [s.cache for s, _ in work], rows
    )
    for (session, _), end in zip(work, itertools.accumulate(rows)):
        session._root_hidden, session._root_feature = hidden[end - 1], feature[end - 1]


def _prune(g: _Growth, cfg: TreeConfig, min_score: float) -> bool:
    """Drop the frontier nodes that can no longer be selected (below min_prob, or below the
    best total_tokens - 1 candidates so far, a strong lookup chain's included): none of their
    children could be, so expanding them would only cost time and the tree is unchanged.
    Returns whether any node is left to expand."""
    bar = g.cands.bar(cfg.total_tokens, min_score)
    live = [j for j, node in enumerate(g.frontier) if g.cands.scores[node] >= bar]
    if len(live) < len(g.frontier):
        g.frontier, g.inputs = [g.frontier[j] for j in live], g.inputs[live]
    return bool(live)


def _expand(head: DraftHead, cfg: TreeConfig, growths: Sequence[_Growth], depth: int) -> None:
    """One depth for every growing tree: one head forward and one draft LM head product over
    all frontiers, then each tree keeps the top_k best children as its next frontier."""
    masks, ids, positions = [], [], []
    for g in growths:
        base, cands = g.session.cache.length, g.cands
        for j, node in enumerate(g.frontier):
            g.slots[node] = base + j
        mask = torch.zeros(len(g.frontier), base + len(g.frontier), dtype=torch.bool)
        mask[:, : g.committed] = True
        for j, node in enumerate(g.frontier):
            a = node
            while a != 0:
                mask[j, g.slots[a]] = True
                a = cands.parents[a]
        masks.append(mask.to(g.session.device))
        ids += [cands.tokens[n] for n in g.frontier]
        positions += [g.committed + depth - 2] * len(g.frontier)
    device = growths[0].session.device
    rows = [len(g.frontier) for g in growths]
    hidden, feature = head.step_many(
        torch.cat([g.inputs for g in growths]), torch.tensor(ids, device=device), torch.tensor(positions, device=device),
        masks, [g.session.cache for g in growths], rows,
    )
    logp = torch.log_softmax(head.logits(hidden).float(), -1)
    top = torch.topk(logp, min(cfg.top_k, logp.shape[-1]), dim=-1)
    kk = top.indices.shape[-1]
    tokens, values = head.d2t[top.indices].tolist(), top.values.tolist()
    at = 0
    for g, n in zip(growths, rows):
        cands = g.cands
        children = [
            cands.add(parent, token, cands.scores[parent] + value)
            for parent, row_tokens, row_values in zip(g.frontier, tokens[at : at + n], values[at : at + n])
            for token, value in zip(row_tokens, row_values)
        ]
        best = sorted(range(len(children)), key=lambda j: (-cands.scores[children[j]], j))[: cfg.top_k]
        g.frontier = [children[j] for j in best]
        g.inputs = feature[[at + j // kk for j in best]]
        at += n


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
