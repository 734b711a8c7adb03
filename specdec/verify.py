"""Pure acceptance over a draft token tree: greedy path walk and lossless sampling.

Vocabulary (as in vLLM's rejection sampler):
- *accepted* tokens are draft nodes the target agrees with, a path from the tree's root;
- the *bonus* token is drawn from the target at the last accepted node (the root if none),
  from what is left of the target distribution after the rejected children were removed.

The draft tree is deterministic (top-k), so every proposed child has draft probability 1. At a
node with target distribution p, children are tried in order: child x is accepted with
probability p(x); on rejection p(x) is set to 0 and p renormalised. If every child is rejected
the bonus token is sampled from the residual p. The emitted token is therefore distributed
exactly as p, which makes speculative sampling lossless. Greedy is the special case where p is
a point mass on the argmax. No model and no state here: inputs in, decision out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.sampling import sample, uniform


@dataclass(frozen=True)
class Acceptance:
    """Result of verifying one tree.

    path: node indices from the root (index 0, always first) to the deepest accepted node.
    bonus_token: the token the target emits after the last node of `path`.
    """

    path: list[int]
    bonus_token: int

    @property
    def num_accepted(self) -> int:
        """Draft tokens accepted (root excluded)."""
        return len(self.path) - 1


def children_lists(parents: Sequence[int]) -> list[list[int]]:
    """Children of every node, in node order (which is the draft's preference order)."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[parent].append(node)
    return children


def verify_greedy(tokens: Sequence[int], parents: Sequence[int], target_argmax: Sequence[int]) -> Acceptance:
    """Walk from the root while the target's argmax at the node is one of its children."""
    children = children_lists(parents)
    path = [0]
    node = 0
    while True:
        wanted = int(target_argmax[node])
        nxt = next((c for c in children[node] if tokens[c] == wanted), None)
        if nxt is None:
            return Acceptance(path=path, bonus_token=wanted)
        path.append(nxt)
        node = nxt


def verify_sampling(
    tokens: Sequence[int],
    parents: Sequence[int],
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Acceptance:
    """Lossless recursive rejection sampling over a deterministic draft tree.

    target_probs: [num_nodes, vocab] warped target distributions (rows sum to 1), row i being
    the distribution of the token that follows node i.
    """
    children = children_lists(parents)
    path = [0]
    node = 0
    while True:
        # A copy only where rejected children will be zeroed; a leaf samples from the row itself.
        p = target_probs[node].detach().to("cpu", torch.float64, copy=bool(children[node]))
        accepted = None
        for child in children[node]:
            x = tokens[child]
            mass = float(p.sum())
            if mass <= 0.0:
                break
            if uniform(generator) < float(p[x]) / mass:
                accepted = child
                break
            p[x] = 0.0
        if accepted is None:
            if float(p.sum()) <= 0.0:
                # Only reachable if the children covered the whole support and were all
                # rejected, which has probability zero; fall back to the full distribution.
                p = target_probs[node].detach().to("cpu", torch.float64)
            return Acceptance(path=path, bonus_token=sample(p, generator))
        path.append(accepted)
        node = accepted
