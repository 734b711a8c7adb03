"""`specdec bench` on a tiny random target: the harness, its JSON, the report and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.bench.harness import AR, SPEC, BenchConfig, Divergence, find_divergence, run_bench
from specdec.bench.peers import make_peers
from specdec.bench.report import HISTOGRAM_PNG, SPEEDUP_PNG, markdown_table, write_report
from specdec.bench.summary import machine_info, summarize
from specdec.bench.data import DEV_QUESTIONS
from specdec.cli import build_parser, main
from specdec.config import DEFAULT_PREFIX_CACHE_TOKENS, ConfigError
from specdec.train.data import Question, read_questions
from tests.tiny import CharTokenizer, OracleDrafter, tiny_drafter, tiny_runner

USER, ASSISTANT, PROMPT_END = 58, 59, 60  # ids outside the letters CharTokenizer decodes to
QUESTIONS = [
    Question("q1", "writing", ["DescribeAnIsland", "NowShorter"]),
    Question("q2", "math", ["AddTwoAndThree"]),
]


pytestmark = pytest.mark.usefixtures("one_thread")


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer with a minimal chat template: a role id before each message's letters."""

    chat_template = "role-id + letters"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        ids = [t for m in messages for t in [USER if m["role"] == "user" else ASSISTANT, *self.encode(m["content"])]]
        return ids + [PROMPT_END] if add_generation_prompt else ids


def chat_runner(seed: int = 0):
    runner = tiny_runner(seed)
    runner.tokenizer = ChatCharTokenizer()
    return runner


def bench(runner, drafter, peers=(), **config):
    cfg = BenchConfig(**{"max_new_tokens": 24, "warmup_tokens": 4, **config})
    records = run_bench(runner, drafter, QUESTIONS, cfg, peers)
    return records, summarize(records, cfg.greedy, {"max_new_tokens": cfg.max_new_tokens}, machine_info(runner))


def test_harness_json_has_the_figures_and_no_greedy_mismatch():
    runner = chat_runner()
    records, result = bench(runner, OracleDrafter(runner, width=2, depth=3), make_peers(runner, ["hf", "pld"]))
    assert [(r.question_id, r.turn) for r in records] == [("q1", 0), ("q1", 1), ("q2", 0)]
    json.dumps(result)  # serialisable as is
    overall = result["overall"]
    for key in ("tau", "speedup", "spec_tokens_per_s", "ar_tokens_per_s", "greedy_mismatches", "acceptance_histogram", "accepted_by_depth"):
        assert key in overall and all(key in b for b in result["per_category"].values())
    assert set(result["per_category"]) == {"writing", "math"}
    assert overall["greedy_mismatches"] == 0 and overall["near_tie_mismatches"] == 0 and result["mismatches"] == []
    assert overall["turns"] == 3 and overall["questions"] == 2
    spec = [r.runs[SPEC] for r in records]
    assert overall["tau"] == round(sum(s.new_tokens for s in spec) / sum(s.target_forwards for s in spec), 4)
    assert overall["tau"] > 1.0  # the oracle drafter gets accepted
    assert sum(overall["acceptance_histogram"]) == overall["rounds"] == sum(len(s.accepted_per_round) for s in spec)
    assert overall["spec_tokens_per_s"] > 0 and overall["ar_tokens_per_s"] > 0 and overall["speedup"] > 0
    assert overall["spec_draft_ms_per_round"] > 0 and overall["spec_verify_ms_per_round"] > 0 and overall["ar_forward_ms_per_round"] > 0
    spec_ms = 1000 * sum(s.seconds for s in spec) / sum(s.target_forwards - 1 for s in spec)
    assert overall["spec_draft_ms_per_round"] + overall["spec_verify_ms_per_round"] <= spec_ms + 1e-3  # parts of the whole
    assert set(overall["peers"]) == {"hf", "pld"}
    assert all(p["tokens_per_s"] > 0 and p["mismatches_vs_ar"] == 0 for p in overall["peers"].values())
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"] == torch.__version__


def test_every_path_decodes_the_same_prompt_with_the_ar_answer_as_context():
    runner = chat_runner(1)
    records, _ = bench(runner, tiny_drafter(runner))
    first, second = records[0], records[1]
    ar_text = runner.tokenizer.encode(runner.tokenizer.decode(first.runs[AR].token_ids))
    expected = [USER, *runner.tokenizer.encode("DescribeAnIsland"), ASSISTANT, *ar_text, USER, *runner.tokenizer.encode("NowShorter"), PROMPT_END]
    assert all(run.prompt_tokens == len(expected) for run in second.runs.values())
    assert all(run.token_ids == first.runs[AR].token_ids for run in first.runs.values())
    assert first.runs[SPEC].draft_tokens > 0 and first.runs[AR].draft_tokens == 0


def test_each_path_reuses_its_own_earlier_turns_with_a_prefix_cache():
    runner = chat_runner(1)
    records, result = bench(runner, OracleDrafter(runner, width=2, depth=3), prefix_cache_tokens=1000)
    first, second, other = records
    for name in (AR, SPEC):
        assert first.runs[name].cached_prompt_tokens == 0  # the warm-up's entry was dropped
        # Turn 2 restores turn 1's prompt and answer (as far as the re-encoded answer agrees).
        assert second.runs[name].cached_prompt_tokens > len(runner.tokenizer.encode("DescribeAnIsland"))
    overall = result["overall"]
    assert overall["greedy_mismatches"] == 0 and overall["near_tie_mismatches"] == 0
    assert overall["ar_cached_prompt_tokens"] == sum(r.runs[AR].cached_prompt_tokens for r in records)
    assert overall["spec_cached_prompt_tokens"] == sum(r.runs[SPEC].cached_prompt_tokens for r in records)
    assert overall["prompt_tokens"] == overall["spec_prompt_tokens"] == sum(r.runs[AR].prompt_tokens for r in records)
    assert overall["ar_mean_ttft_ms"] == round(1000 * sum(r.runs[AR].ttft for r in records) / len(records), 4)
    assert 0 < overall["spec_mean_ttft_ms"] and all(0 < r.runs[SPEC].ttft <= r.runs[SPEC].seconds for r in records)
    uncached = bench(runner, OracleDrafter(runner, width=2, depth=3))[0]
    assert [r.runs[AR].token_ids for r in uncached] == [r.runs[AR].token_ids for r in records]
    assert all(run.cached_prompt_tokens == 0 for r in uncached for run in r.runs.values())


class AssistantCharTokenizer(ChatCharTokenizer):
    """Every id round-trips through text (chr(65 + id)), and a generation prompt opens the
    assistant message as the message itself does (as real chat templates do): a conversation's
    next prompt extends the last one's prompt and answer."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        ids = super().apply_chat_template(messages, False, tokenize)
        return ids + [ASSISTANT] if add_generation_prompt else ids


def test_sampled_paths_continue_their_own_conversations_and_restore_them():
    runner = chat_runner(4)
    runner.tokenizer = AssistantCharTokenizer()
    records, result = bench(runner, tiny_drafter(runner), make_peers(runner, ["hf"]), temperature=1.0, prefix_cache_tokens=1000)
    first, second = records[0], records[1]
    # The same seed gives the same answer on both paths (one draw per token from equal rows).
    assert first.runs[AR].token_ids == first.runs[SPEC].token_ids
    assert result["overall"]["sampled_mismatches"] == 0 and result["overall"]["greedy_mismatches"] is None
    opening = [USER, *runner.tokenizer.encode("DescribeAnIsland"), ASSISTANT]
    for name in (AR, SPEC):
        answer = first.runs[name].token_ids
        assert second.runs[name].prompt_tokens == len(opening) + len(answer) + 1 + len("NowShorter") + 1
        # Its own first turn comes back from its cache: all of it but the answer's last token,
        # which no forward ran.
        assert second.runs[name].cached_prompt_tokens == len(opening) + len(answer) - 1
    assert second.runs["hf"].prompt_tokens == second.runs[AR].prompt_tokens  # peers follow the AR conversation
    overall = result["overall"]
    assert overall["prompt_tokens"] == sum(r.runs[AR].prompt_tokens for r in records)
    assert overall["spec_prompt_tokens"] == sum(r.runs[SPEC].prompt_tokens for r in records)


def test_a_divergence_is_found_classified_and_counted():
    runner = chat_runner(2)
    records, _ = bench(runner, tiny_drafter(runner))
    prompt = [USER, 1, 2, 3, PROMPT_END]
    ar = [5, 6, 7, 8]
    assert find_divergence(runner, prompt, ar, list(ar), 1e-4) is None
    d = find_divergence(runner, prompt, ar, [5, 6, 9, 9], 1e-4)
    assert (d.position, d.ar_token, d.token) == (2, 7, 9) and d.margin > 0 and not d.near_tie
    assert find_divergence(runner, prompt, ar, [5, 6, 9, 9], float("inf")).near_tie
    short = find_divergence(runner, prompt, ar, ar[:3], 1e-4)
    assert (short.position, short.ar_token, short.token) == (3, 8, None)
    records[1].runs[SPEC].divergence = d
    records[2].runs[SPEC].divergence = Divergence(0, 1, 2, 1e-6, True)
    result = summarize(records, True, {}, {})
    assert result["overall"]["greedy_mismatches"] == 1 and result["overall"]["near_tie_mismatches"] == 1
    assert result["per_category"]["writing"]["greedy_mismatches"] == 1
    assert [(m["question_id"], m["turn"], m["position"], m["near_tie"]) for m in result["mismatches"]] == [("q1", 1, 2, False), ("q2", 0, 0, True)]


def test_sampling_counts_mismatches_at_the_same_seed_without_near_ties():
    runner = chat_runner(3)
    records, result = bench(runner, tiny_drafter(runner), temperature=1.0, warmup_tokens=0)
    overall = result["overall"]
    assert overall["greedy_mismatches"] is None and overall["near_tie_mismatches"] is None
    assert overall["sampled_mismatches"] == 0 and result["mismatches"] == [] and overall["spec_new_tokens"] > 0
    records[0].runs[SPEC].divergence = Divergence(1, 4, 5, 2.0, False)
    result = summarize(records, False, {}, {})
    assert result["overall"]["sampled_mismatches"] == 1 and result["overall"]["greedy_mismatches"] is None
    assert "| 1 | - |" in markdown_table(result)


def test_report_writes_markdown_and_plots(tmp_path):
    runner = chat_runner(4)
    _, result = bench(runner, OracleDrafter(runner), make_peers(runner, ["hf"]))
    paths = write_report(result, tmp_path / "report")
    assert {p.name for p in paths} == {"report.md", SPEEDUP_PNG, HISTOGRAM_PNG}
    for png in (SPEEDUP_PNG, HISTOGRAM_PNG):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| writing |" in text and "| math |" in text and "**overall**" in text and "hf tok/s" in text
    assert f"Prompts: {result['overall']['prompt_tokens']} tokens" in text and "Mean time to first token" in text


def test_unknown_peer_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown peer"):
        make_peers(chat_runner(), ["hf", "vllm"])


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--questions", "--limit", "--per-category", "--max-new-tokens", "--temperature", "--head", "--peers", "--json", "--report", "--top-k", "--model", "--prefix-cache-tokens"):
        assert option in out


def test_cli_runs_end_to_end_on_a_tiny_target(tmp_path, monkeypatch, capsys):
    """The command with its loading swapped for the tiny target (a random head is built for it)."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns}) + "\n" for q in QUESTIONS))
    monkeypatch.setattr("specdec.options.load_runner", lambda args: chat_runner(5))
    out_json, report = tmp_path / "out" / "bench.json", tmp_path / "report"
    argv = ["bench", "--questions", str(questions), "--limit", "1", "--max-new-tokens", "12", "--head", "random"]
    argv += ["--peers", "pld,head", "--json", str(out_json), "--report", str(report), "--top-k", "3", "--depth", "3", "--total-tokens", "6", "--min-prob", "0.01", "--lookup-tokens", "4", "--lookup-alone", "0.8"]
    assert main(argv) == 0
    result = json.loads(out_json.read_text())
    assert result["overall"]["greedy_mismatches"] == 0 and result["overall"]["turns"] == 2
    assert result["config"]["tree"] == {"top_k": 3, "depth": 3, "total_tokens": 6, "min_prob": 0.01, "lookup_tokens": 4, "lookup_alone": 0.8, "head_context": 128}
    assert result["config"]["peers"] == ["pld", "head"]
    assert result["config"]["prefix_cache_tokens"] == DEFAULT_PREFIX_CACHE_TOKENS  # on by default, as in the server
    assert result["overall"]["spec_cached_prompt_tokens"] > 0 and result["overall"]["ar_cached_prompt_tokens"] > 0
    head = result["overall"]["peers"]["head"]
    assert head["mismatches_vs_ar"] == 0 and head["tau"] >= 1.0 and head["new_tokens"] == result["overall"]["ar_new_tokens"]
    assert result["overall"]["peers"]["pld"]["tau"] is None
    assert "| writing |" in capsys.readouterr().out
    assert (report / "report.md").is_file()


def test_cli_refuses_unknown_peers_and_a_head_peer_without_lookup(tmp_path, monkeypatch, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns}) + "\n" for q in QUESTIONS))
    monkeypatch.setattr("specdec.options.load_runner", lambda args: chat_runner(5))
    base = ["bench", "--questions", str(questions), "--limit", "1", "--max-new-tokens", "4", "--head", "random"]
    assert main(base + ["--peers", "hf,vllm"]) == 2
    assert "unknown peer(s) vllm; known: hf, pld, head" in capsys.readouterr().err
    assert main(base + ["--peers", "head", "--lookup-tokens", "0"]) == 2
    assert "lookup drafting" in capsys.readouterr().err
    assert main(base + ["--prefix-cache-tokens", "-1"]) == 2
    assert "--prefix-cache-tokens must be >= 0" in capsys.readouterr().err


def test_cli_per_category_takes_the_first_questions_of_each_category(tmp_path, monkeypatch, capsys):
    questions = tmp_path / "questions.jsonl"
    extra = Question("q3", "writing", ["AnotherOne"])
    questions.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns}) + "\n" for q in [*QUESTIONS, extra]))
    monkeypatch.setattr("specdec.options.load_runner", lambda args: chat_runner(5))
    out_json = tmp_path / "bench.json"
    argv = ["bench", "--questions", str(questions), "--per-category", "1", "--max-new-tokens", "4", "--head", "random", "--json", str(out_json)]
    assert main(argv) == 0
    result = json.loads(out_json.read_text())
    assert result["config"]["questions"] == 2 and result["config"]["per_category"] == 1
    assert set(result["per_category"]) == {"writing", "math"}
    assert main([*argv[:3], "--per-category", "0"]) != 0
    assert "--per-category must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "costs", "fidelity"])
def test_every_bench_command_has_help_with_the_activations_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--activations" in out and "--threads" in out
    assert ("--questions" in out) == (command != "costs")


@pytest.mark.parametrize("argv", [["bench"], ["fidelity"], ["train", "evaluate", "--head", "random"], ["train", "agreement", "--head", "h"]])
def test_question_commands_default_to_the_shipped_dev_set(argv):
    """A fresh clone runs them without any data beside the checkout."""
    parser, _ = build_parser()
    assert parser.parse_args(argv).questions == str(DEV_QUESTIONS)


def test_the_shipped_dev_set_is_spec_bench_format():
    questions, report = read_questions(DEV_QUESTIONS)
    assert len(questions) == 90 and not report.skipped
    assert len({q.category for q in questions}) == 13
    assert all(1 <= len(q.turns) <= 2 for q in questions)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_concurrency_bench_rows_and_no_mismatch(temperature):
    """Every level runs plain and adaptive speculation (and full trees when asked) over all
    questions; batched answers equal the plain answers at concurrency 1."""
    from specdec.bench.concurrency import ADAPTIVE, FULL, PLAIN, markdown, run_concurrency

    runner = chat_runner(2)
    questions = QUESTIONS + [Question("q3", "qa", ["WhyIsTheSkyBlue"]), Question("q4", "qa", ["Hi"])]
    result = run_concurrency(
        runner, tiny_drafter(runner, seed=2), questions, [1, 3], max_new_tokens=12, temperature=temperature, full_trees=True, progress=False
    )
    rows = result["rows"]
    assert [(r["concurrency"], r["path"]) for r in rows] == [(c, p) for c in (1, 3) for p in (PLAIN, ADAPTIVE, FULL)]
    for r in rows:
        assert r["requests"] == len(questions) and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert r["mismatches"] == 0
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] and r["ttft_p50_s"] <= r["latency_p95_s"]
    assert rows[0]["vs_plain"] == 1.0 and set(result["forward_ms_by_rows"]) >= {"1", "8"}
    assert "| 3 | speculative |" in markdown(result)


def test_bench_cli_concurrency_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("specdec.options.load_runner", lambda args: chat_runner(3))
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns}) for q in QUESTIONS))
    out = tmp_path / "c.json"
    code = main(["bench", "--questions", str(path), "--concurrency", "1,2", "--max-new-tokens", "6", "--head", "random", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["settings"]["levels"] == [1, 2] and len(result["rows"]) == 4
    assert main(["bench", "--questions", str(path), "--concurrency", "0,2", "--head", "random"]) == 2
    assert "--concurrency needs user counts >= 1" in capsys.readouterr().err
