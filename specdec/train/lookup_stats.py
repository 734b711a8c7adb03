"""`specdec train lookup-stats`: how often lookup chains (`specdec.lookup`) are accepted, by the
length of the suffix match that found them.

The acceptance table in `specdec.lookup` (FIRST_TOKEN_PROB, NEXT_TOKEN_PROB) is this command's
output on the target's own greedy answers to 11,266 training prompts (written by
`specdec train regenerate`): at every position of an answer, the index over the prompt and the
answer so far proposes a chain, which is compared with what the answer really goes on with. Run it on
another target's answers to calibrate lookup drafting for that target.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tqdm import tqdm

from specdec.lookup import MAX_MATCH, NgramIndex


def chain_stats(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], chain: int, max_match: int = MAX_MATCH) -> dict[int, list[int]]:
    """For (prompt ids, answer ids) pairs: match length -> reached, where reached[j] counts the
    proposals whose first j tokens were all right (reached[0]: all proposals)."""
    stats: dict[int, list[int]] = {}
    for prompt, answer in pairs:
        if not answer:
            continue
        index = NgramIndex(1, max_match)
        index.extend(list(prompt) + [answer[0]])
        for t in range(1, len(answer)):
            draft = index.lookup(chain)
            if draft is not None:
                right = 0
                while right < len(draft.tokens) and t + right < len(answer) and draft.tokens[right] == answer[t + right]:
                    right += 1
                reached = stats.setdefault(draft.match, [0] * (chain + 1))
                for j in range(right + 1):
                    reached[j] += 1
            index.extend(answer[t : t + 1])
    return stats


def summarize(stats: dict[int, list[int]]) -> dict[str, dict]:
    """Per match length: proposals, the first token's acceptance rate and each further token's
    rate given the ones before it were accepted (None where nothing reached that far)."""
    out = {}
    for match in sorted(stats):
        reached = stats[match]
        rates = [reached[j] / reached[j - 1] if reached[j - 1] else None for j in range(1, len(reached))]
        out[str(match)] = {"proposals": reached[0], "first": rates[0], "next": rates[1:]}
    return out


def conversation_pairs(runner, conversations: list[list[dict]], progress: bool = False):
    """(prompt ids through the chat template, first reply's ids) of each conversation."""
    for messages in tqdm(conversations, desc="lookup-stats", unit="conversation", disable=not progress):
        reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = runner.encode_messages(messages[:reply])
        yield prompt, runner.tokenizer(messages[reply]["content"], add_special_tokens=False)["input_ids"]
