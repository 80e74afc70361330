#!/usr/bin/env bash
# Runs the GPU bundle (scripts/gpu-bundle.sh packs this script beside the binaries) on the GPU
# machine, in one call of the device tool:
#
#   bash run-gpu.sh [all|tests|bench] [--dry-run]      (default: all)
#
# all   = tests, then bench, in one call (the budgets below add up to at most 8 minutes);
# tests = the driver check and nvidia-smi; the emulator's conformance tests (when the bundle
#         has them); every family's tests with ATTNKIT_REQUIRE_GPU=1 (a test cannot pass by
#         skipping); the tour; compute-sanitizer memcheck, racecheck and synccheck on a
#         small-shape subset of every family;
# bench = the driver check; the peers (peers.py: PyTorch SDPA, fla, torch.matmul) and
#         attnkit-bench at the same cases; report.py's report and plots.
# --dry-run: what CI runs on a CPU machine: prints each step, its budget and its command, checks
#         that the bundle holds what the step runs (when run from a bundle), and reports
#         "skipped: no GPU"; exits 0 unless the budgets overrun or the bundle lacks a file.
#
# Every step has its own time budget (`timeout`); a step that runs out is recorded as TIMEOUT
# and the next one starts. Results land in $OUT as each step finishes, so a call cut short
# still returns what ran. At most 8 files (what the device tool brings back):
#   summary.txt  one line per step (PASS / FAIL rc / TIMEOUT / SKIP), rewritten after each
#   log.txt      every step's full output, appended as it runs
#   peers.jsonl, ours.jsonl, report.md, plots.tar   (bench)
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# $OUT absolute before the cd below (a relative one names a folder where the caller stands).
OUT="${OUT:-/tmp/attnkit-gpu-out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$here"

mode=all
dry=0
for arg in "$@"; do
  case "$arg" in
    all | tests | bench) mode="$arg" ;;
    --dry-run) dry=1 ;;
    -h | --help)
      sed -n '2,24p' "$0"
      exit 0
      ;;
    *)
      echo "run-gpu.sh: unknown argument '$arg' (all | tests | bench | --dry-run)" >&2
      exit 2
      ;;
  esac
done

# A bundle holds COMMIT; run from scripts/ (CI's dry run without a bundle) it does not, and
# the files a step needs are only listed.
in_bundle=0
[[ -f COMMIT ]] && in_bundle=1
commit=$(cat COMMIT 2> /dev/null || git -C "$here" rev-parse --short HEAD 2> /dev/null || echo unknown)

work="$(mktemp -d /tmp/attnkit-gpu.XXXXXX)"
log="$OUT/log.txt"
summary="$OUT/summary.txt"
: > "$log"
results=()

# The families, one test binary each; the tour checks all of them once more end to end.
families=(runtime flash decode lightning monarch)

# Seconds per step. The sum for `all` must stay within 8 minutes (480 s), which leaves a
# 10-minute call room for the machine's start, the transfer and unpacking the bundle.
# Sized from the CPU side of each binary here (flash's, the longest, takes 39 s on 2 busy
# cores; the GPU machine has 16) plus the GPU work; the sanitizer subsets take about a second
# of CPU time each, the rest is the sanitizer's start and its slowed kernels. The peers get
# the most: importing torch and triton's first compile of fla's kernels.
declare -A budget=(
  [driver]=10
  [emulator]=30
  [test-runtime]=10 [test-flash]=50 [test-decode]=30 [test-lightning]=30 [test-monarch]=20
  [tour]=10
  # per tool (memcheck, racecheck, synccheck): 40 s a tool, 120 s in all
  [san-runtime]=5 [san-flash]=14 [san-decode]=8 [san-lightning]=8 [san-monarch]=7
  [peers]=90
  [bench]=60
  [report]=10
)
sanitizer_tools=(memcheck racecheck synccheck)

# The small-shape subset per family for compute-sanitizer, by test name (libtest filters: a
# test runs when its name contains one of them). Each named test's shapes are small (under a
# few hundred rows or tokens) and together they reach every kernel of the family:
#   runtime   the strided scale and the params echo of every family;
#   flash     d128 f32 (CUDA cores) and f16 (mma) at 2x130x77 with sink logits and entropy;
#             bf16 d64 windows and sinks at 300x300, 150x333, 333x150; the backward's
#             tensor-core kernels (bf16, f16; d64, d128; up to 70x70);
#   decode    paged and contiguous bf16 caches (lengths 1, 517, 0, 100; 2 splits + combine);
#             in-place append, contiguous and paged, f16, 3 sequences of up to 64;
#   lightning forward (lengths 1 to 4097, d 64/128, all dtypes), decode step, backward at the
#             finite-difference cases (lengths 70, 3, 0, 130);
#   monarch   bf16 mma multiply (5 shapes, 15 to 129 tokens); transpose (simt, 3 to 40 tokens);
#             backward.
declare -A sanitize=(
  [runtime]="gpu::"
  [flash]="learned_sink_logits_including_infinities windows_and_sinks_bf16 backward_bf16_and_f16_meet_flashattention_s_rule"
  [decode]="paged_and_contiguous_caches_agree append_fills_contiguous_and_paged_caches_in_place"
  [lightning]="gpu::forward_gpu gpu::decode_gpu gpu::backward_gpu_matches_finite_differences"
  [monarch]="gpu::multiply_gpu_many_tokens gpu::transpose_gpu gpu::backward_gpu"
)

steps_tests=(driver emulator)
for f in "${families[@]}"; do steps_tests+=("test-$f"); done
steps_tests+=(tour)
for t in "${sanitizer_tools[@]}"; do
  for f in "${families[@]}"; do steps_tests+=("sanitizer-$t-$f"); done
done
steps_bench=(peers bench report)
case "$mode" in
  all) plan=("${steps_tests[@]}" "${steps_bench[@]}") ;;
  tests) plan=("${steps_tests[@]}") ;;
  bench) plan=(driver "${steps_bench[@]}") ;;
esac
budget_of() { # step name -> seconds
  case "$1" in
    sanitizer-*) echo "${budget[san-${1##*-}]}" ;;
    *) echo "${budget[$1]}" ;;
  esac
}
total=0
for s in "${plan[@]}"; do total=$((total + $(budget_of "$s"))); done

say() { echo "$*" | tee -a "$log"; }
write_summary() {
  printf '%s\n' "commit $commit" "mode $mode$([[ $dry == 1 ]] && echo ' (dry run)')" \
    "budget ${total} s" "${results[@]}" > "$summary"
}
record() { # line
  results+=("$1")
  write_summary
  echo "$1"
}

say "attnkit GPU run: commit $commit, mode $mode, $(date -u +%FT%TZ)"
say "budgets: ${#plan[@]} steps, ${total} s in all (at most 480)"
if ((total > 480)); then
  say "run-gpu.sh: the budgets add up to ${total} s, over the 8 minutes (480 s) of one call"
  exit 2
fi
write_summary

missing=0
have_gpu=0
sanitizer_ok=1

# step NAME FILE WHAT CMD...: runs CMD under NAME's budget. FILE: the bundle file it needs (or
# ""); WHAT: what the dry run prints for it ("": CMD itself). `timeout` runs programs, so the
# steps written as functions run as `bash -c FUNCTION` (exported with what they read).
step() {
  local name="$1" need="$2" what="$3"
  shift 3
  [[ -n "$what" ]] || what="$*"
  local secs
  secs=$(budget_of "$name")
  if ((dry)); then
    local note=""
    if [[ -n "$need" && ! -e "$need" ]]; then
      if ((in_bundle)); then
        note=" [MISSING from the bundle: $need]"
        missing=$((missing + 1))
      else
        note=" [$need: in the bundle]"
      fi
    fi
    say "--- $name (${secs} s): would run: $what$note"
    record "SKIP $name: no GPU (dry run)"
    return 0
  fi
  if ((!have_gpu)) && [[ "$name" != driver ]]; then
    record "SKIP $name: no GPU"
    return 0
  fi
  if [[ -n "$need" && ! -e "$need" ]]; then
    record "FAIL $name: $need is not in the bundle"
    return 0
  fi
  local t0=$SECONDS rc from
  say "--- $name (budget ${secs} s): $what"
  # Straight into log.txt, so even a call cut off mid-step returns this step's output so far.
  from=$(($(stat -c %s "$log") + 1))
  timeout -k 5 "$secs" "$@" >> "$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    record "PASS $name (${took} s)"
  elif ((rc == 124 || rc == 137)); then
    record "TIMEOUT $name (budget ${secs} s)"
  else
    record "FAIL $name (rc $rc, ${took} s)"
  fi
  # compute-sanitizer refuses some machines' GPUs (seen under gVisor: "Device not supported"):
  # then say so once and skip the other sanitizer steps rather than fail each.
  if [[ "$name" == sanitizer-* ]] && tail -c "+$from" "$log" | grep -q "Device not supported"; then
    sanitizer_ok=0
    results[-1]="SKIP $name: compute-sanitizer does not support this device here"
    write_summary
  fi
  return 0
}

export ATTNKIT_REQUIRE_GPU=1 RUST_BACKTRACE=1 OUT work commit mode
threads="--test-threads=$(nproc 2> /dev/null || echo 4)"

# 1. The driver and the GPU.
driver_check() {
  nvidia-smi || return 1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  ldconfig -p | grep -m1 'libcuda\.so' || { echo "libcuda.so not found by ldconfig"; return 1; }
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
}
export -f driver_check
step driver "" "nvidia-smi; ldconfig -p | grep libcuda.so" bash -c driver_check
if ((!dry)) && [[ "${results[-1]}" == PASS* ]]; then have_gpu=1; fi

if [[ $mode == all || $mode == tests ]]; then
  # 2. The emulator's conformance tests: the GPU checks the emulator's answers.
  # (Outside a bundle, the dry run shows the step; a bundle built without it skips it.)
  if [[ -x tests/emulator_conformance ]] || ((dry && !in_bundle)); then
    step emulator tests/emulator_conformance "" tests/emulator_conformance "$threads"
  else
    record "SKIP emulator: not built (no tests/emulator_conformance in the bundle)"
  fi
  # 3. Every family's tests, GPU required.
  for f in "${families[@]}"; do
    step "test-$f" "tests/$f" "" "tests/$f" "$threads"
  done
  step tour attnkit "" ./attnkit
  # 4. compute-sanitizer on the small-shape subset of every family.
  for t in "${sanitizer_tools[@]}"; do
    for f in "${families[@]}"; do
      name="sanitizer-$t-$f"
      if ((!dry)) && ((have_gpu)) && ! command -v compute-sanitizer > /dev/null; then
        record "SKIP $name: compute-sanitizer not on PATH"
        continue
      fi
      if ((!sanitizer_ok)); then
        record "SKIP $name: compute-sanitizer does not support this device here"
        continue
      fi
      # shellcheck disable=SC2086 # the filters are words
      step "$name" "tests/$f" "" compute-sanitizer --tool "$t" --error-exitcode 3 --print-limit 20 \
        "tests/$f" --test-threads=1 ${sanitize[$f]}
    done
  done
fi

if [[ $mode == all || $mode == bench ]]; then
  # 5. The peers and attnkit-bench at the same cases in this call, then the report.
  if ((!dry)) && compgen -G 'wheels/*.whl' > /dev/null; then
    # fla (the Lightning Attention peer) is pure Python; torch and triton are on the machine.
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" wheels/*.whl \
      >> "$log" 2>&1 && export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  cases="$work/cases.jsonl"
  export cases
  run_peers() { ./attnkit-bench --list > "$cases" && python3 peers.py --cases "$cases" > "$OUT/peers.jsonl"; }
  export -f run_peers
  step peers peers.py "attnkit-bench --list > cases.jsonl; python3 peers.py --cases cases.jsonl \
> \$OUT/peers.jsonl" bash -c run_peers
  run_bench() {
    local peak
    peak=$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "ceilings" and r.get("matmul_tflops"):
        print(r["matmul_tflops"]); break' "$OUT/peers.jsonl" 2> /dev/null)
    ./attnkit-bench ${peak:+--peak-tflops "$peak"} > "$OUT/ours.jsonl"
  }
  export -f run_bench
  step bench attnkit-bench "./attnkit-bench --peak-tflops <peers' matmul ceiling> > \$OUT/ours.jsonl" \
    bash -c run_bench
  run_report() {
    [[ -f "$OUT/peers.jsonl" ]] || : > "$OUT/peers.jsonl"
    python3 report.py --ours "$OUT/ours.jsonl" --peers "$OUT/peers.jsonl" --out "$work/report" \
      --commit "$commit" --command "bash run-gpu.sh $mode" || return 1
    cp "$work/report/report.md" "$OUT/report.md"
    (cd "$work/report" && tar -cf "$OUT/plots.tar" --exclude report.md .)
  }
  export -f run_report
  step report report.py "python3 report.py ... --out report; cp report.md plots.tar to \$OUT" \
    bash -c run_report
fi

failed=0
for r in "${results[@]}"; do [[ $r == FAIL* || $r == TIMEOUT* ]] && failed=$((failed + 1)); done
echo
cat "$summary"
rm -rf "$work"
if ((dry)); then
  if ((missing > 0)); then
    echo "run-gpu.sh --dry-run: $missing file(s) missing from the bundle" >&2
    exit 1
  fi
  exit 0
fi
((have_gpu)) || { echo "run-gpu.sh: no GPU: nothing ran" >&2; exit 1; }
((failed == 0))
