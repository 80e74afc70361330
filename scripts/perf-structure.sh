#!/usr/bin/env bash
# The kernels' structure, measured without a GPU: registers and spills (ptxas), theoretical
# occupancy, and the PTX emulator's counters (barriers, shared-memory bytes per tensor-core
# FLOP, bank conflicts per warp access, global sectors per request) for the small shapes of
# `attnkit-bench --structure`. Proxies for speed, not timings: docs/perf-structure.md.
#
#   scripts/perf-structure.sh [OUT_DIR]     # default target/perf-structure; prints a table
#
# Needs nvcc (scripts/toolchain.sh). Takes a few minutes: a release build (kernels included),
# then each case once under the emulator with every check on.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-target/perf-structure}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/*.jsonl

# ptxas' reports land in the build script's output; spills fail the build, as in CI.
export ATTNKIT_PTXAS_VERBOSE=1 ATTNKIT_DENY_SPILLS=1 ATTNKIT_REQUIRE_NVCC=1
cargo build --quiet --release --bin attnkit-bench
bench="${CARGO_TARGET_DIR:-target}/release/attnkit-bench"
ptxas_log="$out/ptxas.txt"
# The newest build-script output of the attnkit package holds this build's ptxas lines.
build_out="$(ls -t "${CARGO_TARGET_DIR:-target}"/release/build/attnkit-*/output 2>/dev/null \
    | xargs grep -l "Compiling entry function" | head -1)"
cp "$build_out" "$ptxas_log"

cases="$("$bench" --structure --list | python3 -c '
import json, sys
for line in sys.stdin:
    c = json.loads(line)
    print(c["family"] + "/" + c["case"])
')"
for c in $cases; do
    file="$out/${c//\//__}.jsonl"
    echo "perf-structure: $c" >&2
    ATTNKIT_EMU_COUNTERS="$file" scripts/emulate.sh "$bench" --structure --case "$c" \
        > "$out/${c//\//__}.result"
done
python3 scripts/perf_structure.py "$out" "$ptxas_log" kernels/flash.h
