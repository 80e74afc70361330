#!/usr/bin/env bash
# Builds, here, the release test binaries, the tour and the bench binaries with the kernels
# embedded (sm_80 + sm_90a SASS, compute_90 PTX: nothing compiles on the GPU machine), gathers
# them into .gpu/ (git-ignored) with a script that runs them there, and prints the device
# tool's `run` call. The GPU machine has no cargo; it only runs what we carry.
#
#   scripts/gpu-bundle.sh            # build and gather
#   then: run(command="bash .gpu/run-gpu.sh", carry=[".gpu"])
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/toolchain.sh" > /dev/null
export ATTNKIT_REQUIRE_NVCC=1

rm -rf .gpu && mkdir -p .gpu/tests .gpu/benches
# Test and bench executables: cargo names them in its JSON messages.
cargo test --release --no-run --message-format=json 2> /dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kinds = m["target"]["kind"]
    if "test" in kinds or ("lib" in kinds and m["profile"]["test"]):
        name = m["target"]["name"] + ("-unit" if "lib" in kinds else "")
        shutil.copy(m["executable"], ".gpu/tests/" + name)
'
cargo bench --no-run --message-format=json 2> /dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        shutil.copy(m["executable"], ".gpu/benches/" + m["target"]["name"])
'
cargo build --release --bins 2> /dev/null
cp target/release/attnkit target/release/attnkit-bench .gpu/
cp scripts/peers.py scripts/report.py .gpu/
# The Lightning Attention peer (pure Python; torch, triton and einops are on the GPU machine).
mkdir -p .gpu/wheels
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d .gpu/wheels fla-core==0.6.0
strip .gpu/attnkit .gpu/attnkit-bench .gpu/tests/* .gpu/benches/* 2> /dev/null || true
git rev-parse HEAD > .gpu/COMMIT 2> /dev/null || echo unknown > .gpu/COMMIT

cat > .gpu/run-gpu.sh <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine. `bash .gpu/run-gpu.sh [tests|bench|all]` (default all).
# tests: driver check, the tour, every test binary (ATTNKIT_REQUIRE_GPU=1: a missing GPU
#        fails them), then compute-sanitizer memcheck and racecheck over the GPU tests.
# bench: the peers (scripts/peers.py) and attnkit-bench at the same cases in this same call,
#        merged by report.py into $OUT/bench/report.md and one PNG per family.
# Full log under $OUT; a short summary last.
set -u
mode="${1:-all}"
cd "$(dirname "$0")"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
log="$OUT/gpu-log.txt"; : > "$log"
summary=()
step() { # name, command...
  local name="$1"; shift
  echo "=== $name: $*" >> "$log"
  if "$@" >> "$log" 2>&1; then summary+=("PASS $name"); else summary+=("FAIL $name (rc $?)"); fi
}
{ echo "commit $(cat COMMIT)"; date -u; nvidia-smi -L; ldconfig -p | grep -m1 libcuda.so; } >> "$log" 2>&1
export ATTNKIT_REQUIRE_GPU=1
if [[ $mode == tests || $mode == all ]]; then
  step tour ./attnkit
  for t in tests/*; do step "test $(basename "$t")" "$t" --test-threads=1; done
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      step "sanitizer $tool" compute-sanitizer --tool "$tool" --error-exitcode 3 tests/runtime --test-threads=1 gpu::
    done
  fi
fi
if [[ $mode == bench || $mode == all ]]; then
  mkdir -p "$OUT/bench"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl >> "$log" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  ./attnkit-bench --list > "$OUT/bench/cases.jsonl"
  step "peers" sh -c "python3 peers.py --cases '$OUT/bench/cases.jsonl' > '$OUT/bench/peers.jsonl'"
  peak=$(python3 -c "import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l)
    if r.get('kind')=='ceilings': print(r['matmul_tflops'])" "$OUT/bench/peers.jsonl" 2>/dev/null | head -n1)
  step "attnkit-bench" sh -c "./attnkit-bench ${peak:+--peak-tflops $peak} > '$OUT/bench/ours.jsonl'"
  step "report" python3 report.py --ours "$OUT/bench/ours.jsonl" --peers "$OUT/bench/peers.jsonl" \
    --out "$OUT/bench" --commit "$(cat COMMIT)" --command "bash .gpu/run-gpu.sh $mode"
fi
echo; tail -n 60 "$log"; echo
printf '%s\n' "commit $(cat COMMIT)" "${summary[@]}" | tee "$OUT/summary.txt"
RUN
chmod +x .gpu/run-gpu.sh
du -sh .gpu
echo
echo "Bundle ready ($(cat .gpu/COMMIT)). On the GPU machine, through the device tool:"
echo '  run(command="bash .gpu/run-gpu.sh all", carry=[".gpu"])   # or: tests | bench'
