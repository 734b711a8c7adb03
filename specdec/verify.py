"""Pure acceptance over a draft token tree: one walk for greedy decoding and lossless sampling.

Vocabulary (as in vLLM's rejection sampler):
- *accepted* tokens are draft nodes the target agrees with, a path from the tree's root;
- the *bonus* token is drawn from the target at the last accepted node (the root if none),
  from what is left of the target distribution after the rejected children were removed.

The draft tree is deterministic (top-k), so every proposed child has draft probability 1. The
usual rule at a node with target distribution p tries the children in order: child x is
accepted with probability p(x); on rejection p(x) is set to 0 and p renormalised; if every
child is rejected the bonus token is drawn from the residual p. Child x is then accepted with
probability exactly p(x), and a token y that is no child comes out as the bonus with
probability exactly p(y): the same outcome as drawing one token from p and accepting the child
that carries it, or emitting it as the bonus if none does. That single draw is what
`verify_walk` does at each node on its path, so the emitted tokens follow the target exactly,
and greedy decoding is the same walk with the argmax as the draw. Only the nodes on the path
are ever asked for, so a sampled row off it costs nothing (`TargetRunner.token_after`). No
model and no state here: inputs in, decision out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


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


def verify_walk(tokens: Sequence[int], parents: Sequence[int], token_after: Callable[[int], int]) -> Acceptance:
    """Walk from the root: at each node ask for the target's token after it (`token_after(node)`:
    its argmax, or a draw from its distribution); accept the child that carries it and go on,
    else it is the bonus token."""
    children = children_lists(parents)
    path = [0]
    node = 0
    while True:
        wanted = int(token_after(node))
        nxt = next((c for c in children[node] if tokens[c] == wanted), None)
        if nxt is None:
            return Acceptance(path=path, bonus_token=wanted)
        path.append(nxt)
        node = nxt

