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
cargo build --release --bin attnkit 2> /dev/null
cp target/release/attnkit .gpu/attnkit
strip .gpu/attnkit .gpu/tests/* .gpu/benches/* 2> /dev/null || true
git rev-parse HEAD > .gpu/COMMIT 2> /dev/null || echo unknown > .gpu/COMMIT

cat > .gpu/run-gpu.sh <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine: driver check, the tour, every test binary (a missing GPU fails
# them: ATTNKIT_REQUIRE_GPU=1), then compute-sanitizer memcheck and racecheck over the GPU
# tests. Full log under $OUT; a short summary last.
set -u
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
step tour ./attnkit
for t in tests/*; do step "test $(basename "$t")" "$t" --test-threads=1; done
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    step "sanitizer $tool" compute-sanitizer --tool "$tool" --error-exitcode 3 tests/runtime --test-threads=1 gpu::
  done
fi
echo; cat "$log" | tail -n 60; echo
printf '%s\n' "commit $(cat COMMIT)" "${summary[@]}" | tee "$OUT/summary.txt"
RUN
chmod +x .gpu/run-gpu.sh
du -sh .gpu
echo
echo "Bundle ready ($(cat .gpu/COMMIT)). On the GPU machine, through the device tool:"
echo '  run(command="bash .gpu/run-gpu.sh", carry=[".gpu"])'
