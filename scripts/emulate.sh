#!/usr/bin/env bash
# Runs a command on attnkit's PTX emulator instead of a GPU.
#
#   scripts/emulate.sh CMD [ARGS...]      e.g. scripts/emulate.sh cargo test --test runtime
#
# Builds the CPU "libcuda" (emulator/driver, release), links it as libcuda.so and
# libcuda.so.1 in target/emulator/lib/, puts that folder first on LD_LIBRARY_PATH, and execs
# CMD. Anything that opens the CUDA driver at run time (cudarc with dynamic-loading, as
# attnkit does) then finds one sm_90 device, "attnkit PTX emulator (CPU, sm_90)", whose
# kernels run in the interpreter with its checks on. Works from any directory.
#
# Environment knobs (read at each launch):
#   ATTNKIT_EMU_CHECKS  comma list of the checks to keep on (memcheck,racecheck,initcheck,
#                       synccheck), or all (the default) or none
#   ATTNKIT_EMU_BUDGET  thread-instructions one launch may execute before it fails
#                       (an endless-loop guard)
#   ATTNKIT_EMU_TRACE   1: print each launch (kernel, grid, block, shared memory,
#                       thread-instructions, seconds) to stderr
#   ATTNKIT_EMU_COUNTERS FILE: append one JSON line of counters per launch to FILE
#                       (barriers, mma, shared bytes and wavefronts, global sectors)
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]   (runs CMD with the PTX emulator as libcuda)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where cargo puts the build: CARGO_TARGET_DIR if set (cargo reads a relative one from the
# current directory), else the workspace's target/.
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac

cargo build --quiet --release -p attnkit-emulator-driver --manifest-path "$root/Cargo.toml"

lib="$target/release/libattnkit_emu_cuda.so"
if [ ! -f "$lib" ]; then
    echo "$0: $lib was not built" >&2
    exit 1
fi
dir="$target/emulator/lib"
mkdir -p "$dir"
ln -sfn "$lib" "$dir/libcuda.so"
ln -sfn "$lib" "$dir/libcuda.so.1"

export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
