"""Plain dataclasses for everything configurable; always passed explicitly, never global."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the message says which and why."""


# What the default target's GGUF products multiply their weights with (`TargetRunner.load`).
ACTIVATIONS = ("float32", "int8")

# Tokens of finished sequences a verifier keeps for prompts that start with them
# (`specdec.prefix_cache`): about 400 MB of keys, values and features for the default target.
DEFAULT_PREFIX_CACHE_TOKENS = 8192


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next-token distribution is warped and sampled.

    temperature 0 means greedy (argmax). top_k 0 disables top-k; top_p 1.0 disables top-p.
    The same warping is used by the plain autoregressive path and by speculative verification,
    which is what makes sampling lossless.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 dynamic tree: expand the top_k best frontier nodes for `depth` steps, then keep
    the `total_tokens` best nodes (root included) by cumulative draft log-probability.

    Defaults are chosen on the 2-core CPU (2 threads, the target's C++ decoder stack on its GGUF
    blocks, the C++ head on Q8_0), by A/B runs of whole generations in one process (plain
    decoding and each tree shape in turn per turn, 26 dev questions, 128 tokens a turn, greedy;
    2026-11-26): top_k 4, depth 5, 6 nodes, min_prob 0.25 gave 1.315x plain decoding where
    depth 3 / 8 nodes / 0.2 (the default before) gave 1.245x, depth 4 1.285x and depth 5 with
    8 nodes 1.280x; in a second run (a quieter hour, plain 82.9 tokens/s) 5 nodes, min_prob
    0.3, top_k 3 and depth 6 / min_prob 0.2 were all within 1.6% of it. Here a forward of 1 /
    2 / 4 / 6 / 8 nodes costs about 9 / 11 / 14 / 19 / 23 ms (`specdec costs`, decoder stack and
    LM head), so every node past the first costs 1.2-1.7 ms, and a proposal 2.3-2.7 ms a round.
    A small tree reaching deeper pays: the trained heads' top drafts are accepted in long runs,
    while unlikely siblings cost as much as likely ones. The single most likely draft is
    verified whatever its probability (`tree.select_nodes`), so a head of unknown calibration,
    such as a random one, still gets a draft tried each round.
    On a GPU, where a node costs next to nothing, use the reference settings (top_k 10, depth 6,
    total_tokens 60) and min_prob 0 (EAGLE-2's plain top-`total_tokens` tree).

    `min_prob` (ours, in the spirit of EAGLE-2's confidence-driven trees): a node whose
    cumulative draft probability is below it is not verified, and drafting stops at a depth
    where every frontier node is below it. On a CPU each verified node has a real price, so a
    round should only pay for nodes with a fair chance of acceptance.

    `lookup_tokens` (ours): the most tokens of a lookup chain (`specdec.lookup`: what followed
    the last earlier occurrence of the sequence's current suffix) added to the tree as
    candidates scored like the head's nodes; 0 turns lookup drafting off. `lookup_alone`
    (ours): a chain whose first token is estimated at least this likely to be accepted (a long
    repeat) is proposed without running the head that round, which saves the proposal's cost
    where the head would rarely add a better node (the features wait and the head reads them
    in its next round); 1 never skips the head.

    `head_context` (ours): the most (feature, token) pairs before the answer that the head reads
    when a session opens: the prompt's last ones (0 = all). Why: the head's first proposal read
    the whole prompt, about 0.25 ms a token on the 2-core CPU (0.25 s after a 1,000-token
    prompt, 1.6 s after 4,000), and on 26 dev questions, and on the 20 with the longest prompts
    (rag, summarization), reading the last 128 gave the same τ (2.343 against 2.341, 1.839
    against 1.829). Lookup chains still search the whole prompt.
    """

    top_k: int = 4
    depth: int = 5
    total_tokens: int = 6
    min_prob: float = 0.25
    lookup_tokens: int = 7
    lookup_alone: float = 0.7
    head_context: int = 128

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.depth < 1 or self.total_tokens < 1:
            raise ConfigError(f"tree settings must be >= 1: {self}")
        if self.lookup_tokens < 0:
            raise ConfigError(f"lookup_tokens must be >= 0: {self.lookup_tokens}")
        if self.head_context < 0:
            raise ConfigError(f"head_context must be >= 0: {self.head_context}")
        if not 0.0 < self.lookup_alone <= 1.0:
            raise ConfigError(f"lookup_alone must be in (0, 1]: {self.lookup_alone}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ConfigError(f"min_prob must be in [0, 1): {self.min_prob}")

    @classmethod
    def from_attributes(cls, source: object) -> "TreeConfig":
        """The tree settings held by any object with one attribute per field of the same name
        (parsed command-line flags, a service's settings)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class StopConfig:
    """When a generation ends: after max_new_tokens, at an EOS id, or at a stop string."""

    max_new_tokens: int = 128
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
