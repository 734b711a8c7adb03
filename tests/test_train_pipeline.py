"""The training pipeline end to end on a tiny random target: extract, vocab, fit, evaluate."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.config import ConfigError
from specdec.train.cache import load_sequences, target_fingerprint
from specdec.train.extract import extract, tokenize_chat
from specdec.train.fit import FitConfig, fit
from specdec.train.vocab import choose_vocab, load_vocab, save_vocab
from tests.tiny import CharTokenizer, tiny_runner

VOCAB = 64


class ChatCharTokenizer(CharTokenizer):
    """A character tokenizer with a toy chat template: <role id> content <end id>."""

    chat_template = "toy"
    ROLE_IDS = {"system": 60, "user": 61, "assistant": 62}
    END = 63

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        """Special tokens are written as private-use characters in the template's text form."""
        return {"input_ids": [ord(c) - 0xE000 if ord(c) >= 0xE000 else ord(c) % 60 for c in text]}

    def encode(self, text: str) -> list[int]:
        return self(text)["input_ids"]

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        special = lambda i: chr(0xE000 + i)  # noqa: E731
        text = "".join(special(self.ROLE_IDS[m["role"]]) + m["content"] + special(self.END) for m in messages)
        text += special(self.ROLE_IDS["assistant"]) if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def chat_runner(seed: int = 0):
    runner = tiny_runner(seed=seed, vocab=VOCAB, eos=ChatCharTokenizer.END)
    runner.tokenizer = ChatCharTokenizer()
    return runner


def write_conversations(path, n: int = 12, bad_lines: int = 0) -> None:
    lines = []
    for i in range(n):
        question = f"what is {i} plus {i + 1}?"
        answer = f"the answer is {2 * i + 1}. " * (1 + i % 3)
        lines.append(json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}))
    for j in range(bad_lines):
        lines.insert(2 + j, "{not json" if j % 2 == 0 else json.dumps({"messages": [{"role": "user", "content": 3}]}))
    path.write_text("\n".join(lines) + "\n")


def test_mask_covers_exactly_the_assistant_reply():
    tok = ChatCharTokenizer()
    ids, mask = tokenize_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert [i for i, m in zip(ids, mask) if m] == [*tok.encode("yo"), tok.END]
    assert ids[: len(ids) - 3] == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def questions_file(path) -> None:
    rows = [
        {"question_id": 1, "category": "math", "turns": ["what is 2 plus 3?", "and 4 plus 5?"]},
        {"question_id": 2, "category": "writing", "turns": ["write about 7"]},
        {"question_id": 3, "category": "math", "turns": ["what is 9 plus 9?"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A feature cache, a vocabulary and a 40-step FSPAD run on the tiny target."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pipeline")
    runner = chat_runner()
    write_conversations(tmp / "conv.jsonl", n=12, bad_lines=2)
    counts = extract(runner, tmp / "conv.jsonl", tmp / "cache", max_len=64, shard_size=5, progress=False)
    sequences = load_sequences(tmp / "cache", runner)
    d2t, coverage = choose_vocab(sequences, 32, VOCAB, runner.eos_token_ids)
    save_vocab(tmp / "vocab.safetensors", d2t, target_fingerprint(runner), coverage)
    cfg = FitConfig(steps=40, tokens_per_step=192, lr=3e-3, warmup_steps=4)
    result = fit(runner, sequences, d2t, cfg, tmp / "run", checkpoint_every=10, progress=False)
    return {"tmp": tmp, "runner": runner, "counts": counts, "sequences": sequences, "d2t": d2t, "cfg": cfg, "result": result}


def test_extract_counts_bad_lines_and_stores_features(pipeline):
    counts, sequences, runner = pipeline["counts"], pipeline["sequences"], pipeline["runner"]
    assert counts["conversations"] == 12 and counts["skipped"] == 2 and counts["shards"] == 3
    assert len(sequences) == 12
    first = sequences[0]
    from specdec.train.extract import features_of

    assert torch.allclose(first.features.float(), features_of(runner, first.ids.tolist()), atol=1e-2)
    assert first.mask.any() and not first.mask[0]


def test_extract_resumes_and_extends(pipeline, tmp_path):
    runner, tmp = pipeline["runner"], pipeline["tmp"]
    extract(runner, tmp / "conv.jsonl", tmp_path / "c", limit=7, max_len=64, shard_size=5, progress=False)
    again = extract(runner, tmp / "conv.jsonl", tmp_path / "c", max_len=64, shard_size=5, progress=False)
    assert again["new_tokens"] == sum(len(s.ids) for s in pipeline["sequences"][5:])  # shard 0 kept, 1 refilled
    resumed = load_sequences(tmp_path / "c", runner)
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.features, b.features) for a, b in zip(resumed, pipeline["sequences"]))


def test_vocab_keeps_eos_and_covers_assistant_tokens(pipeline):
    d2t = pipeline["d2t"]
    assert d2t.numel() == 32 and torch.equal(d2t, d2t.sort().values) and ChatCharTokenizer.END in d2t.tolist()
    extra = torch.zeros(VOCAB, dtype=torch.int64)
    extra[[5, 6]] = 10_000  # tokens frequent in text that has no features
    d2t, coverage = choose_vocab(pipeline["sequences"], 4, VOCAB, (ChatCharTokenizer.END,), extra)
    assert d2t.tolist()[:2] == [5, 6] and ChatCharTokenizer.END in d2t.tolist() and 0.9 < coverage < 1.0


def test_shrunk_head_drafts_its_most_frequent_tokens_with_the_same_weights(pipeline):
    from specdec.head import DraftHead

    runner, sequences = pipeline["runner"], pipeline["sequences"]
    head = DraftHead.load(pipeline["tmp"] / "run" / "head", runner.embed_tokens, runner.lm_head.weight, runner.config)
    own = head.d2t.clone()
    d2t, coverage = choose_vocab(sequences, 8, VOCAB, (ChatCharTokenizer.END,), candidates=own)
    _, full = choose_vocab(sequences, own.numel(), VOCAB, candidates=own)
    assert set(d2t.tolist()) <= set(own.tolist()) and ChatCharTokenizer.END in d2t.tolist() and 0 < coverage < full
    small = head.with_draft_vocab(d2t)
    assert small.cfg.draft_vocab_size == 8 and torch.equal(small.d2t, d2t)
    feats, ids, pos = torch.randn(5, runner.hidden_size), torch.tensor([1, 2, 3, 4, 5]), torch.arange(5)
    with torch.no_grad():
        hidden, feature = head(feats, ids, pos)
        hidden_small, feature_small = small(feats, ids, pos)
        columns = torch.tensor([own.tolist().index(t) for t in d2t.tolist()])
        assert torch.equal(hidden, hidden_small) and torch.equal(feature, feature_small)
        torch.testing.assert_close(small.logits(hidden), head.logits(hidden)[:, columns])  # the same rows (BLAS may block them differently)
    outside = sorted(set(range(VOCAB)) - set(own.tolist()))
    if outside:
        with pytest.raises(ConfigError, match="subset"):
            head.with_draft_vocab(torch.tensor(sorted(d2t.tolist()[:3] + outside[:1])))
    with pytest.raises(ConfigError, match="size"):
        choose_vocab(sequences, own.numel() + 1, VOCAB, candidates=own)


def test_fit_lowers_the_loss(pipeline):
    log = [json.loads(line) for line in (pipeline["tmp"] / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first
    assert pipeline["result"]["finished"] and (pipeline["tmp"] / "run" / "head" / "config.json").is_file()


def test_resume_equals_uninterrupted_run(pipeline, tmp_path):
    runner, sequences, d2t, cfg = pipeline["runner"], pipeline["sequences"], pipeline["d2t"], pipeline["cfg"]
    stopped = fit(runner, sequences, d2t, cfg, tmp_path / "run", checkpoint_every=7, stop_at=13, progress=False)
    assert stopped["step"] == 13 and not stopped["finished"]
    fit(runner, sequences, d2t, cfg, tmp_path / "run", checkpoint_every=7, progress=False)
    whole = torch.load(pipeline["tmp"] / "run" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == whole["step"] == 40
    for name, value in whole["head"].items():
        assert torch.equal(value, resumed["head"][name]), name


def test_profiled_steps_are_written_and_change_nothing(pipeline, tmp_path):
    runner, sequences, d2t, cfg = pipeline["runner"], pipeline["sequences"], pipeline["d2t"], pipeline["cfg"]
    fit(runner, sequences, d2t, cfg, tmp_path / "run", stop_at=5, progress=False, profile_steps=3)
    profile = (tmp_path / "run" / "profile.txt").read_text()
    assert profile.startswith("# 3 steps after one warm-up step") and "aten::mm" in profile
    logged = lambda run: (run / "log.jsonl").read_text().splitlines()  # noqa: E731
    plain = [json.loads(line) for line in logged(pipeline["tmp"] / "run")[:5]]
    profiled = [json.loads(line) for line in logged(tmp_path / "run")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in profiled] == [{k: v for k, v in r.items() if k != "seconds"} for r in plain]


def test_init_head_starts_from_the_saved_head_and_refuses_another_variant(pipeline, tmp_path):
    from dataclasses import replace

    from specdec.train.fit import new_head

    runner, sequences, d2t, cfg = pipeline["runner"], pipeline["sequences"], pipeline["d2t"], pipeline["cfg"]
    saved = pipeline["tmp"] / "run" / "head"
    warm_cfg = replace(cfg, steps=5, init=str(saved))
    start = new_head(runner, warm_cfg, d2t).state_dict()
    trained = torch.load(pipeline["tmp"] / "run" / "checkpoint.pt", weights_only=False)["head"]
    for name, value in trained.items():
        expected = value.half().float() if value.is_floating_point() else value  # heads are saved in float16
        assert torch.equal(start[name], expected), name
    warm = fit(runner, sequences, d2t, warm_cfg, tmp_path / "warm", progress=False)
    cold = fit(runner, sequences, d2t, replace(cfg, steps=5), tmp_path / "cold", progress=False)
    assert warm["finished"] and warm["loss"] < 0.7 * cold["loss"]
    with pytest.raises(ConfigError, match="differs"):
        new_head(runner, replace(warm_cfg, variant="eagle2", feature_sampling=False, partial_alignment=False), d2t)
    unused = next(t for t in range(VOCAB) if t not in d2t.tolist())
    other_vocab = torch.cat([d2t[1:], torch.tensor([unused])]).sort().values
    moved = new_head(runner, warm_cfg, other_vocab)
    assert torch.equal(moved.d2t, other_vocab) and torch.equal(moved.fc.weight, start["fc.weight"])


def test_checkpoint_of_another_run_is_refused(pipeline):
    from dataclasses import replace

    runner, sequences, d2t, cfg = pipeline["runner"], pipeline["sequences"], pipeline["d2t"], pipeline["cfg"]
    with pytest.raises(ConfigError, match="another run"):
        fit(runner, sequences, d2t, replace(cfg, variant="eagle2", feature_sampling=False, partial_alignment=False), pipeline["tmp"] / "run", progress=False)


def test_cache_and_vocab_of_another_target_are_refused(pipeline):
    other = chat_runner(seed=1)
    tmp = pipeline["tmp"]
    with pytest.raises(ConfigError, match="fingerprint"):
        load_sequences(tmp / "cache", other)
    with pytest.raises(ConfigError, match="fingerprint"):
        extract(other, tmp / "conv.jsonl", tmp / "cache", max_len=64, shard_size=5, progress=False)
    with pytest.raises(ConfigError, match="fingerprint"):
        load_vocab(tmp / "vocab.safetensors", target_fingerprint(other), VOCAB)


def test_head_for_another_target_is_refused(pipeline):
    from specdec.drafter import load_head_drafter
    from specdec.config import TreeConfig

    bigger = tiny_runner(vocab=96)
    with pytest.raises(ConfigError, match="vocab"):
        load_head_drafter(bigger, str(pipeline["tmp"] / "run" / "head"), TreeConfig())


def test_evaluate_reports_tau_per_category_and_resumes(pipeline, tmp_path):
    from specdec.config import TreeConfig
    from specdec.drafter import load_head_drafter
    from specdec.train.data import read_questions
    from specdec.train.evaluate import evaluate

    runner = pipeline["runner"]
    questions_file(tmp_path / "q.jsonl")
    questions, report = read_questions(tmp_path / "q.jsonl")
    assert len(questions) == 3 and len(report.skipped) == 1
    drafter = load_head_drafter(runner, str(pipeline["tmp"] / "run" / "head"), TreeConfig(top_k=3, depth=3, total_tokens=8, min_prob=0.0))
    progress = tmp_path / "progress.jsonl"
    partial = evaluate(runner, drafter, questions[:2], max_new_tokens=12, progress_file=progress, progress=False)
    result = evaluate(runner, drafter, questions, max_new_tokens=12, progress_file=progress, progress=False)
    assert len(progress.read_text().splitlines()) == 3 and partial["questions"] == 2
    assert result["overall"]["tau"] >= 1.0 and set(result["per_category"]) == {"math", "writing"}
    assert result["overall"]["new_tokens"] == 4 * 12
    sampled = evaluate(runner, drafter, questions[:1], temperature=1.0, max_new_tokens=12, progress=False)["overall"]
    # Every forward commits a token except one that ends its turn at EOS, so tau may dip below 1
    # on short sampled answers, but forwards never exceed tokens + turns.
    turns = len(questions[0].turns)
    assert 0 < sampled["new_tokens"] <= 12 * turns and sampled["target_forwards"] <= sampled["new_tokens"] + turns
    assert sampled["tau"] == round(sampled["new_tokens"] / sampled["target_forwards"], 4)


def test_every_train_command_has_help(capsys):
    from specdec.cli import build_parser

    parser, _ = build_parser()
    for command in ("extract", "prompts", "regenerate", "vocab", "shrink", "fit", "evaluate", "agreement", "lookup-stats"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", command, "--help"])
        assert "usage: specdec train " + command in capsys.readouterr().out


def test_regenerate_stores_the_targets_own_answers(pipeline, tmp_path):
    from specdec.train.extract import features_of
    from specdec.train.regenerate import regenerate

    runner = pipeline["runner"]
    counts = regenerate(runner, pipeline["tmp"] / "conv.jsonl", tmp_path / "regen", limit=6, max_new_tokens=10, batch_size=4, shard_size=4, progress=False)
    assert counts["conversations"] == 6 and counts["skipped"] == 2
    sequences = load_sequences(tmp_path / "regen", runner)
    assert len(sequences) == 6 and (tmp_path / "regen" / "shard-00001.jsonl").is_file()
    for s in sequences:
        prompt = int((~s.mask).sum())
        assert not s.mask[:prompt].any() and 1 <= int(s.mask.sum()) <= 10
        assert torch.allclose(s.features.float(), features_of(runner, s.ids.tolist()), atol=1e-2)
        # Greedy answers: each answer token is the target's argmax after the tokens before it.
        logits = runner.lm_head(features_of(runner, s.ids.tolist()))
        assert torch.equal(logits[prompt - 1 : -1].argmax(-1), s.ids[prompt:])
    again = regenerate(runner, pipeline["tmp"] / "conv.jsonl", tmp_path / "regen", limit=6, max_new_tokens=10, batch_size=4, shard_size=4, progress=False)
    assert again["new_tokens"] == 0


def test_first_per_category_keeps_file_order(tmp_path):
    from specdec.train.data import first_per_category, read_questions

    questions_file(tmp_path / "q.jsonl")
    questions, _ = read_questions(tmp_path / "q.jsonl")
    assert [q.question_id for q in first_per_category(questions, 1)] == ["1", "2"]


def test_select_questions_limits_then_balances_and_refuses_zero(tmp_path, capsys):
    from specdec.train.data import select_questions

    questions_file(tmp_path / "q.jsonl")
    questions, report = select_questions(tmp_path / "q.jsonl", per_category=1)
    assert [q.question_id for q in questions] == ["1", "2"] and len(report.skipped) == 1
    assert "skipped 1 malformed line" in capsys.readouterr().err
    assert [q.question_id for q in select_questions(tmp_path / "q.jsonl", limit=1, per_category=5)[0]] == ["1"]
    with pytest.raises(ConfigError, match="per-category"):
        select_questions(tmp_path / "q.jsonl", per_category=0)


def test_bare_prompts_are_read_only_where_no_reply_is_needed(tmp_path):
    from specdec.train.data import read_conversations

    path = tmp_path / "mixed.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "a bare prompt"}]},
        {"messages": [{"role": "system", "content": "only a system turn"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    chats, report = read_conversations(path)
    assert len(chats) == 1 and [n for n, _ in report.skipped] == [2, 3]
    prompts, report = read_conversations(path, need_reply=False)
    assert len(prompts) == 2 and [n for n, _ in report.skipped] == [3]


def test_prompts_are_the_targets_own_user_turns_and_resume_exactly(pipeline, tmp_path):
    from specdec.train.prompts import user_turn_prefix, write_prompts
    from specdec.train.regenerate import regenerate

    runner = pipeline["runner"]
    tok = runner.tokenizer
    assert user_turn_prefix(tok) == [tok.ROLE_IDS["user"]]
    whole = write_prompts(runner, tmp_path / "whole.jsonl", 4, 4, 48, seed=1, progress=False)
    assert whole["prompts"] + sum(whole["dropped_this_run"].values()) == 16 and whole["prompts"] >= 2
    records = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    texts = [r["messages"][0]["content"] for r in records]
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    assert all(r["messages"][0]["role"] == "user" and len(r["messages"]) == 1 for r in records)
    # Interrupted after 2 batches, then continued: the same file as one uninterrupted run.
    write_prompts(runner, tmp_path / "parts.jsonl", 2, 4, 48, seed=1, progress=False)
    rest = write_prompts(runner, tmp_path / "parts.jsonl", 4, 4, 48, seed=1, progress=False)
    assert (tmp_path / "parts.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert rest["prompts"] == whole["prompts"]
    with pytest.raises(ConfigError, match="temperature"):
        write_prompts(runner, tmp_path / "x.jsonl", 1, temperature=0.0, progress=False)
    # The prompts feed regenerate directly: the target answers them.
    counts = regenerate(runner, tmp_path / "whole.jsonl", tmp_path / "regen", max_new_tokens=6, batch_size=4, shard_size=4, progress=False)
    assert counts["conversations"] == whole["prompts"] and counts["skipped"] == 0
    sequences = load_sequences(tmp_path / "regen", runner)
    assert len(sequences) == whole["prompts"]
    asked = {tuple(s.ids[: int((~s.mask).sum())].tolist()) for s in sequences}
    assert asked == {tuple(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)) for t in texts}


def test_agreement_scores_every_answer_token_after_the_first(pipeline, tmp_path):
    from specdec.config import SamplingParams, StopConfig
    from specdec.drafter import load_head
    from specdec.generate import Generation
    from specdec.train.agreement import agreement
    from specdec.train.data import read_questions

    runner = pipeline["runner"]
    head = load_head(runner, pipeline["tmp"] / "run" / "head").eval()
    questions_file(tmp_path / "q.jsonl")
    questions, _ = read_questions(tmp_path / "q.jsonl")
    one = agreement(runner, head, questions, max_new_tokens=8, top_k=1, progress=False)
    every = agreement(runner, head, questions, max_new_tokens=8, top_k=32, progress=False)
    # The target's own greedy answers, to count what the measure should score.
    in_vocab = scored = 0
    vocab = set(pipeline["d2t"].tolist())
    for q in questions:
        gen = Generation(runner, runner.encode_messages([{"role": "user", "content": q.turns[0]}]), SamplingParams(), StopConfig(max_new_tokens=8))
        for _ in gen:
            pass
        scored += len(gen.token_ids) - 1
        in_vocab += sum(t in vocab for t in gen.token_ids[1:])
    assert one["overall"]["scored"] == every["overall"]["scored"] == scored > 0
    assert one["overall"]["top1"] == every["overall"]["top1"] <= every["overall"]["top32"]
    assert set(one["overall"]) == {"scored", "top1"}
    # With every draft-vocabulary token a draft, a hit is exactly a token inside the vocabulary.
    assert every["overall"]["top32"] == round(in_vocab / scored, 4)
    assert sum(c["scored"] for c in every["per_category"].values()) == scored


def test_lookup_stats_counts_how_far_each_chain_was_right():
    from specdec.train.lookup_stats import chain_stats, summarize

    # After prompt "7 8" the answer "7 8 7 8": at answer position 1 the one-token suffix "7"
    # proposes "8 7" (both right), at 2 the suffix "7 8" proposes "7 8" (both right), at 3 the
    # suffix "7 8 7" proposes "8 7" (only "8" is there).
    stats = chain_stats([([7, 8], [7, 8, 7, 8])], chain=2)
    assert stats == {1: [1, 1, 1], 2: [1, 1, 1], 3: [1, 1, 0]}
    table = summarize(stats)
    assert table["3"] == {"proposals": 1, "first": 1.0, "next": [0.0]}
    assert summarize({4: [2, 0, 0]})["4"] == {"proposals": 2, "first": 0.0, "next": [None]}


def test_lookup_stats_command_reads_conversations(tmp_path, monkeypatch, capsys):
    from specdec.cli import main

    write_conversations(tmp_path / "conv.jsonl", n=6, bad_lines=1)
    monkeypatch.setattr("specdec.options.load_runner", lambda args: chat_runner())
    assert main(["train", "lookup-stats", "--data", str(tmp_path / "conv.jsonl"), "--chain", "3", "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["conversations"] == 6 and result["skipped_lines"] == 1
    # The repeated answers ("the answer is N. the answer is N. ...") give long, right matches.
    longest = result["by_match"][max(result["by_match"], key=int)]
    assert longest["proposals"] > 0 and longest["first"] == 1.0
    assert main(["train", "lookup-stats", "--data", str(tmp_path / "conv.jsonl"), "--chain", "0"]) == 2
    assert "--chain must be >= 1" in capsys.readouterr().err
