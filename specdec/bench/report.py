"""The benchmark result as a markdown table and PNG plots (speedup per category, acceptance
lengths), written from the JSON dict so that a saved result can be re-rendered."""

from __future__ import annotations

from pathlib import Path

SPEEDUP_PNG = "speedup_per_category.png"
HISTOGRAM_PNG = "acceptance_histogram.png"


def markdown_table(result: dict) -> str:
    """Per category and overall: tau, tokens/s of each path and peer, speedup, mismatches."""
    peers = list(result["overall"]["peers"])
    head = ["category", "questions", "turns", "τ", "AR tok/s", "spec tok/s", "speedup"]
    head += [f"{p} tok/s" for p in peers] + [f"spec / {p}" for p in peers] + ["mismatches", "near-ties"]
    rows = [head, ["---"] * len(head)]
    for name, b in [*result["per_category"].items(), ("**overall**", result["overall"])]:
        row = [name, b["questions"], b["turns"], f"{b['tau']:.2f}", f"{b['ar_tokens_per_s']:.1f}", f"{b['spec_tokens_per_s']:.1f}"]
        row += [f"{b['speedup']:.2f}x"] + [f"{b['peers'][p]['tokens_per_s']:.1f}" for p in peers]
        row += [f"{b['peers'][p]['spec_speedup']:.2f}x" for p in peers]
        mismatches = b["greedy_mismatches"] if b["greedy_mismatches"] is not None else b["sampled_mismatches"]
        row += [mismatches, "-" if b["near_tie_mismatches"] is None else b["near_tie_mismatches"]]
        rows.append([str(c) for c in row])
    return "\n".join(_row(r) for r in rows)


def write_report(result: dict, out_dir: str | Path) -> list[Path]:
    """report.md plus the two plots in out_dir (created); returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_speedup(result, out / SPEEDUP_PNG), _plot_histogram(result, out / HISTOGRAM_PNG)]
    report = out / "report.md"
    report.write_text(_markdown(result))
    return [report, *paths]


def _markdown(result: dict) -> str:
    o, cfg, machine = result["overall"], result["config"], result["machine"]
    lines = [
        "# specdec bench",
        "",
        markdown_table(result),
        "",
        "τ = new tokens per target forward; speedup = spec tokens/s over AR tokens/s (same runner, alternating; the same prompts under greedy decoding, each path its own conversation when sampling).",
        "",
        "## Acceptance",
        "",
        f"{o['rounds']} speculative rounds, {o['mean_accepted']:.2f} draft tokens accepted per round, "
        f"{o['draft_tokens_per_round']:.1f} drafted per round, {o['fallback_rounds']} rounds without the drafter, "
        f"{o['paused_rounds']} plain rounds chosen by the back-off.",
        f"Time per round: drafting {o['spec_draft_ms_per_round']:.1f} ms + tree forward {o['spec_verify_ms_per_round']:.1f} ms "
        f"(speculative), against a plain forward of {o['ar_forward_ms_per_round']:.1f} ms.",
        f"Prompts: {o['prompt_tokens']} tokens (AR), {o['spec_prompt_tokens']} (spec); restored from each path's own prefix cache: {o['ar_cached_prompt_tokens']} (AR), "
        f"{o['spec_cached_prompt_tokens']} (spec). Mean time to first token: {o['ar_mean_ttft_ms']:.0f} ms (AR), "
        f"{o['spec_mean_ttft_ms']:.0f} ms (spec).",
        "",
        _row(["accepted", *range(len(o["acceptance_histogram"]))]),
        _row(["---"] * (1 + len(o["acceptance_histogram"]))),
        _row(["rounds", *o["acceptance_histogram"]]),
        _row(["≥ depth rate", "-", *(f"{r:.3f}" for r in o["accepted_by_depth"])]),
        "",
        f"![speedup per category]({SPEEDUP_PNG})",
        f"![acceptance lengths]({HISTOGRAM_PNG})",
        "",
        "## Mismatches (tokens that leave the AR tokens: greedy, speculative or peer; sampled, our paths with the same seed)",
        "",
    ]
    if result["mismatches"]:
        lines += ["| question | category | turn | path | position | AR token | token | top-2 margin | near-tie |", "|" + " --- |" * 9]
        lines += [
            f"| {m['question_id']} | {m['category']} | {m['turn']} | {m['path']} | {m['position']} | {m['ar_token']} | "
            f"{m['token']} | {m['margin']:.3g} | {m['near_tie']} |"
            for m in result["mismatches"]
        ]
    else:
        lines.append("none")
    lines += ["", "## Configuration", ""] + [f"- {k}: {v}" for k, v in cfg.items()]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()]
    return "\n".join(lines) + "\n"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_speedup(result: dict, path: Path) -> Path:
    """Bars: speculative speedup over AR per category and overall, and each peer's own ratio to AR."""
    plt = _pyplot()
    blocks = {**result["per_category"], "overall": result["overall"]}
    names = list(blocks)
    series = {"speculative": [b["speedup"] for b in blocks.values()]}
    for p in result["overall"]["peers"]:
        series[p] = [_peer_over_ar(b, p) for b in blocks.values()]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) * len(series)), 4.0))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("tokens/s relative to our AR path")
    ax.set_title("Speedup per category")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_histogram(result: dict, path: Path) -> Path:
    """Bars: how many rounds accepted 0, 1, 2, ... draft tokens."""
    plt = _pyplot()
    hist = result["overall"]["acceptance_histogram"]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.bar(range(len(hist)), hist)
    ax.set_xticks(range(len(hist)))
    ax.set_xlabel("draft tokens accepted in a round")
    ax.set_ylabel("rounds")
    ax.set_title(f"Acceptance lengths (τ = {result['overall']['tau']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _peer_over_ar(block: dict, peer: str) -> float:
    tps = block["peers"][peer]["tokens_per_s"]
    return tps / block["ar_tokens_per_s"] if block["ar_tokens_per_s"] else 0.0
