"""Distillation of a draft head from cached target features (FSPAD or EAGLE-2 losses).

Pair i of a sequence is (feature f_i, token t_{i+1}); the head predicts f_{i+1} and the
target's distribution of token i+2, which is softmax(lm_head(f_{i+1})) with the target's
frozen LM head. Losses (as in the FSPAD paper): Smooth L1 on the predicted feature
(weight 1.0) and soft cross-entropy on the logits (weight 0.1); with partial alignment each
loss sees only its own half of the head's output. Uniform noise on the input features, AdamW
(0.9, 0.95), linear warm-up, gradient clipping 0.5.

Our choices, not the paper's:
- lr 1e-3 (paper 5e-5) with linear decay to 0: our budget is a few hundred steps on a CPU,
  not epochs over ShareGPT on GPUs; the small lr barely moves a fresh head in that time.
- the target distribution is normalised over the draft vocabulary only (as EAGLE-3 does):
  the head can only ever propose those tokens, and the full 49k softmax would cost as much
  as the head itself on this CPU.
- losses are taken only where the input token t_{i+1} belongs to an assistant reply.
- `unroll` > 1 adds training-time test (the idea of HASS and EAGLE-3, not in FSPAD): step k
  feeds the head its own predicted features of step k-1, attending exactly as a depth-k draft
  does (true-feature keys up to its root, then its own earlier steps' keys), and every step
  has the same targets; the steps' losses are averaged with equal weights (our choice).
- `init` warm-starts from a saved head of the same variant and shape (to train an existing
  head further on new data, or with a new draft vocabulary, on a fresh schedule); the paper
  trains from scratch.
- on a GPU, the training products run in TF32 (the frozen target's features were computed in
  full float32 by extract/regenerate; TF32's error is below their float16 storage's).

Resuming from a checkpoint reproduces an uninterrupted run exactly: the batch order is a pure
function of (seed, epoch) and the noise of (seed, step), drawn on the training device; the lr is
a pure function of the step. Each log line also holds the seconds since this process started
training (throughput, for sizing runs).
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specdec.config import ConfigError
from specdec.head import DraftHead, HeadCache, HeadConfig
from specdec.target import TargetRunner
from specdec.train.cache import Sequence

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
PROFILE_FILE = "profile.txt"
HEAD_DIR = "head"


@dataclass(frozen=True)
class FitConfig:
    """Everything that determines a training run (a checkpoint only resumes an equal one)."""

    variant: str = "fspad"
    feature_sampling: bool = True
    partial_alignment: bool = True
    steps: int = 400
    tokens_per_step: int = 2048
    lr: float = 1e-3
    warmup_steps: int = 20
    feature_weight: float = 1.0
    logit_weight: float = 0.1
    noise: float = 0.1
    clip: float = 0.5
    unroll: int = 1
    seed: int = 0
    data: str = ""
    init: str = ""

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then linear decay to 0 at `steps`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - self.warmup_steps))


def batch_schedule(lengths: list[int], tokens_per_step: int, seed: int, steps: int) -> list[list[int]]:
    """Sequence indices of every step: each epoch a seeded permutation, cut greedily into
    batches of at most `tokens_per_step` tokens (at least one sequence each)."""
    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        batch, used = [], 0
        for i in order:
            if batch and used + lengths[i] > tokens_per_step:
                out.append(batch)
                batch, used = [], 0
            batch.append(i)
            used += lengths[i]
        out.append(batch)
        epoch += 1
    return out[:steps]


def _pad(sequences: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L], features [B, L, d] (float32), assistant mask and valid mask [B, L]."""
    longest = max(len(s.ids) for s in sequences)
    d = sequences[0].features.shape[-1]
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    feats = torch.zeros(len(sequences), longest, d)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    valid = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for b, s in enumerate(sequences):
        n = len(s.ids)
        ids[b, :n], feats[b, :n], mask[b, :n], valid[b, :n] = s.ids, s.features.float(), s.mask, True
    return ids.to(device), feats.to(device), mask.to(device), valid.to(device)


def unroll_mask(length: int, step: int, device: torch.device | None = None) -> torch.Tensor:
    """Attention mask [T, step*T] of unrolled step `step` over the keys of steps 1..step.

    Row j of step k stands for a depth-k draft whose root is position j-k+1: it sees the
    step-1 (true-feature) keys up to that root and, of each step m in 2..k, the key at
    position j-(k-m), its ancestor at depth m (m = k is itself)."""
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(length, device=device)[None]
    blocks = [cols <= rows - (step - 1)] + [cols == rows - (step - m) for m in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


def unrolled_forward(
    head: DraftHead, features: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logit hidden, predicted feature) [..., T, d] of each step 1..steps. Step 1 is plain
    teacher forcing; step k's input at row j is step k-1's prediction at row j-1 (row 0, which
    has none, keeps its true feature; its chain is incomplete, so its loss must be masked)."""
    cache = HeadCache() if steps > 1 else None
    outputs = [head(features, next_tokens, positions, None, cache)]
    for step in range(2, steps + 1):
        previous = outputs[-1][1]
        inputs = torch.cat([features[..., :1, :], previous[..., :-1, :]], dim=-2)
        mask = unroll_mask(features.shape[-2], step, features.device)
        outputs.append(head(inputs, next_tokens, positions, mask, cache))
    return outputs


def losses(head: DraftHead, batch: list[Sequence], cfg: FitConfig, step: int) -> dict[str, torch.Tensor]:
    """Feature loss, logit loss, their weighted sum and draft top-1 accuracy on one batch
    (averaged over unrolled steps; `acc` is step 1's, `accK` step K's)."""
    device = head.fc.weight.device
    ids, feats, mask, valid = _pad(batch, device)
    inputs, targets = feats[:, :-1], feats[:, 1:]
    if cfg.noise:
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        inputs = inputs + (torch.rand(inputs.shape, generator=gen, device=device) * 2 - 1) * cfg.noise
    positions = torch.arange(inputs.shape[1], device=device).expand(inputs.shape[0], -1)
    # Right padding never leaks into real positions: attention is causal.
    keep = mask[:, 1:] & valid[:, 1:]
    target = targets[keep]
    with torch.no_grad():
        target_probs = torch.softmax(head.logits(target), -1)
    parts: dict[str, torch.Tensor] = {}
    feature_losses, logit_losses = [], []
    for k, (logit_hidden, predicted) in enumerate(unrolled_forward(head, inputs, ids[:, 1:], positions, cfg.unroll), 1):
        rows = (positions >= k - 1)[keep]  # among the kept rows, those with a complete chain
        feature_losses.append(F.smooth_l1_loss(predicted[keep][rows], target[rows], reduction="none").mean(-1).mean())
        draft_logp = torch.log_softmax(head.logits(logit_hidden[keep][rows]), -1)
        logit_losses.append(-(target_probs[rows] * draft_logp).sum(-1).mean())
        parts["acc" if k == 1 else f"acc{k}"] = (draft_logp.argmax(-1) == target_probs[rows].argmax(-1)).float().mean()
    feature_loss = torch.stack(feature_losses).mean()
    logit_loss = torch.stack(logit_losses).mean()
    total = cfg.feature_weight * feature_loss + cfg.logit_weight * logit_loss
    return {"loss": total, "feature": feature_loss, "logit": logit_loss, **parts}


def new_head(runner: TargetRunner, cfg: FitConfig, d2t: torch.Tensor) -> DraftHead:
    hcfg = HeadConfig.for_target(
        runner.config,
        cfg.variant,
        draft_vocab_size=d2t.numel(),
        target=runner.name,
        feature_sampling=cfg.feature_sampling,
        partial_alignment=cfg.partial_alignment,
    )
    torch.manual_seed(cfg.seed)
    head = DraftHead(hcfg, runner.embed_tokens, runner.lm_head.weight).to(runner.device)
    head.set_draft_vocab(d2t)
    if cfg.init:
        _warm_start(head, Path(cfg.init), runner)
    return head


def _warm_start(head: DraftHead, directory: Path, runner: TargetRunner) -> None:
    """Copy a saved head's trained weights into `head`; refuses one of another variant or shape.
    The draft vocabulary may differ: it only selects rows of the target's frozen LM head, so
    no trained weight depends on it, and `head` keeps the run's own."""
    saved = DraftHead.load(directory, runner.embed_tokens, runner.lm_head.weight, runner.config)
    ours, theirs = asdict(head.cfg), asdict(saved.cfg)
    mismatch = {k: (v, ours[k]) for k, v in theirs.items() if k != "draft_vocab_size" and ours[k] != v}
    if mismatch:
        raise ConfigError(f"--init-head {directory} differs from this run's head (saved, now): {mismatch}")
    weights = {k: v for k, v in saved.state_dict().items() if k != "d2t"}
    head.load_state_dict({**head.state_dict(), **weights})


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, *_) -> None:
        self.stop = True

    def __exit__(self, *_) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@contextmanager
def _tf32_on(device: torch.device) -> Iterator[None]:
    """TF32 products while training on a GPU (our choice, see above); the process's setting is
    restored afterwards, so that later float32 work in it (decoding, evaluation) stays float32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _save_checkpoint(out: Path, head: DraftHead, opt: torch.optim.Optimizer, cfg: FitConfig, step: int) -> None:
    state = {
        "step": step,
        "fit": asdict(cfg),
        "head_config": asdict(head.cfg),
        "head": {k: v.cpu() for k, v in head.state_dict().items()},
        "optimizer": opt.state_dict(),
    }
    tmp = out / f"{CHECKPOINT_FILE}.tmp{os.getpid()}"
    torch.save(state, tmp)
    tmp.replace(out / CHECKPOINT_FILE)
    head.save(out / HEAD_DIR)


def _resume(out: Path, head: DraftHead, opt: torch.optim.Optimizer, cfg: FitConfig) -> int:
    """Load the checkpoint in `out` if any; returns the step to continue from."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = {**asdict(FitConfig()), **state["fit"]}  # a setting added later keeps its default
    if saved != asdict(cfg):
        changed = {k: (v, asdict(cfg)[k]) for k, v in saved.items() if asdict(cfg)[k] != v}
        raise ConfigError(f"checkpoint {path} belongs to another run (setting: (checkpoint, now)) {changed}; use another --out")
    if state["head_config"] != asdict(head.cfg):
        raise ConfigError(f"checkpoint {path} holds a head for another target or vocabulary: {state['head_config']}")
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


@contextmanager
def _profiled(steps: int, path: Path, device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields a per-step callback; over the first `steps` steps torch's profiler records every
    op (and CUDA kernel on a GPU), and `path` gets the ops by self time: where a step's time
    goes, e.g. to tell host-side work from device work when a GPU run is slow."""
    if steps <= 0:
        yield lambda: None
        return
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    done = []
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=done.append) as prof:
        yield prof.step
    if done:
        events = done[0].key_averages()
        tables = [f"# {steps} steps after one warm-up step\n", events.table(sort_by="self_cpu_time_total", row_limit=30)]
        if device.type == "cuda":
            tables.append(events.table(sort_by="self_device_time_total", row_limit=30))
        path.write_text("\n".join(tables))


def fit(
    runner: TargetRunner,
    sequences: list[Sequence],
    d2t: torch.Tensor,
    cfg: FitConfig,
    out: str | Path,
    checkpoint_every: int = 50,
    stop_at: int | None = None,
    progress: bool = True,
    profile_steps: int = 0,
) -> dict:
    """Train (or resume training) a head into `out`; stops early at step `stop_at` if given
    (as an interruption would). Returns the final step and the last logged losses.
    `profile_steps` > 0 writes `out`/profile.txt (`_profiled`); it changes no result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = new_head(runner, cfg, d2t).train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = _resume(out, head, opt, cfg)
    schedule = batch_schedule([len(s.ids) for s in sequences], cfg.tokens_per_step, cfg.seed, cfg.steps)
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    last: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=f"fit {cfg.variant}", unit="step", disable=not progress)
    started = time.perf_counter()
    with (
        _StopFlag() as flag,
        _tf32_on(runner.device),
        (out / LOG_FILE).open("a") as log,
        _profiled(profile_steps, out / PROFILE_FILE, runner.device) as profile_step,
    ):
        while step < end and not flag.stop:
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            parts = losses(head, [sequences[i] for i in schedule[step]], cfg, step)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            step += 1
            last = {k: round(float(v.detach()), 5) for k, v in parts.items()}
            seconds = round(time.perf_counter() - started, 3)
            log.write(json.dumps({"step": step, "lr": cfg.lr_at(step - 1), **last, "seconds": seconds}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=last["loss"], acc=last["acc"])
            profile_step()
            if step % checkpoint_every == 0 or step == end or flag.stop:
                _save_checkpoint(out, head, opt, cfg, step)
    bar.close()
    return {"step": step, "steps": cfg.steps, "finished": step >= cfg.steps, **last}


def epochs(cfg: FitConfig, sequences: list[Sequence]) -> float:
    """Roughly how many passes over the data the run makes."""
    return cfg.steps * cfg.tokens_per_step / max(1, sum(len(s.ids) for s in sequences))

