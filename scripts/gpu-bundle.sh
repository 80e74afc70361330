#!/usr/bin/env bash
# Builds, here, the GPU bundle: one release test binary per family, the tour, attnkit-bench,
# the emulator's conformance tests when that target exists, peers.py, report.py, fla's wheel
# and scripts/run-gpu.sh, all with the kernels embedded for the GPU we are lent (an H200:
# sm_90a SASS alone, no PTX: nothing compiles there, and the PTX would only serve newer GPUs).
# Packs them into ONE xz archive, .gpu/attnkit-gpu.tar.xz (git-ignored), and fails if that is
# over the size limit: the device tool carries at most 64 MiB.
#
#   scripts/gpu-bundle.sh              build, pack, check the size, print the `run` call
#   scripts/gpu-bundle.sh --no-wheels  the same without downloading fla's wheel (offline; the
#                                      fla peers then report themselves missing)
#
# Environment: ATTNKIT_CUDA_ARCHS (default 90a) and ATTNKIT_CUDA_PTX (default none) as in
# build.rs; GPU_BUNDLE_LIMIT_MIB (default 48, well under the 64 MiB that can travel);
# GPU_BUNDLE_TARGET (default target/gpu-bundle: its own target directory, so the other archs
# do not rebuild the usual target/ each time).
#
# The binaries share the same fatbins (about 10 MiB of sm_90a code each), so xz gets them
# nearly for free with a dictionary larger than the whole tarball: 192 MiB here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
wheels=1
for arg in "$@"; do
  case "$arg" in
    --no-wheels) wheels=0 ;;
    *)
      echo "gpu-bundle.sh: unknown argument '$arg' (--no-wheels)" >&2
      exit 2
      ;;
  esac
done
limit_mib="${GPU_BUNDLE_LIMIT_MIB:-48}"
export ATTNKIT_REQUIRE_NVCC=1
export ATTNKIT_CUDA_ARCHS="${ATTNKIT_CUDA_ARCHS:-90a}"
export ATTNKIT_CUDA_PTX="${ATTNKIT_CUDA_PTX:-none}"
export CARGO_TARGET_DIR="${GPU_BUNDLE_TARGET:-$root/target/gpu-bundle}"
"$root/scripts/toolchain.sh" > /dev/null

name=attnkit-gpu
stage="$CARGO_TARGET_DIR/stage"
bundle="$stage/$name"
archive="$root/.gpu/$name.tar.xz"
rm -rf "$stage" && mkdir -p "$bundle/tests" "$root/.gpu"
t0=$SECONDS

# The test targets: every tests/*.rs of attnkit (one per family), plus `emulator_conformance`
# wherever in the workspace it is defined (the emulator's tests, checked against the GPU).
targets=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
for p in m["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"] and (p["name"] == "attnkit" or t["name"] == "emulator_conformance"):
            print(p["name"], t["name"])
')
# One cargo call per package; the JSON messages name the executables. Building attnkit's
# integration tests builds its binaries (the tour and attnkit-bench) in the same profile.
for pkg in $(echo "$targets" | cut -d' ' -f1 | sort -u); do
  args=()
  for t in $(echo "$targets" | awk -v p="$pkg" '$1 == p { print $2 }'); do args+=(--test "$t"); done
  echo "gpu-bundle: building $pkg: ${args[*]} (sass $ATTNKIT_CUDA_ARCHS, ptx $ATTNKIT_CUDA_PTX)"
  cargo test --release --no-run -p "$pkg" "${args[@]}" --message-format=json-render-diagnostics \
    | python3 -c '
import json, shutil, sys
dest = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind = m["target"]["kind"]
    if "test" in kind:
        shutil.copy(m["executable"], dest + "/tests/" + m["target"]["name"])
    elif "bin" in kind and not m["profile"]["test"] and m["target"]["name"] in ("attnkit", "attnkit-bench"):
        shutil.copy(m["executable"], dest + "/" + m["target"]["name"])
' "$bundle"
done
build_s=$((SECONDS - t0))

cp scripts/run-gpu.sh scripts/peers.py scripts/report.py "$bundle/"
if ((wheels)); then
  # The Lightning Attention peer (pure Python; torch, triton and einops are on the GPU machine).
  # Without the network the bundle still builds (the fla peers then report fla missing).
  mkdir -p "$bundle/wheels"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$bundle/wheels" \
    fla-core==0.6.0 || echo "gpu-bundle: WARNING: could not download fla-core; the bundle has no fla" >&2
fi
strip "$bundle"/attnkit "$bundle"/attnkit-bench "$bundle"/tests/*
git rev-parse --short HEAD > "$bundle/COMMIT" 2> /dev/null || echo unknown > "$bundle/COMMIT"
git diff --quiet HEAD 2> /dev/null || sed -i 's/$/+dirty/' "$bundle/COMMIT"
echo "sass $ATTNKIT_CUDA_ARCHS; ptx $ATTNKIT_CUDA_PTX" > "$bundle/ARCHS"

# Every file must be there: the dry run checks the bundle has what each step runs.
for f in attnkit attnkit-bench run-gpu.sh peers.py report.py tests/runtime tests/flash \
  tests/decode tests/lightning tests/monarch; do
  [[ -e "$bundle/$f" ]] || { echo "gpu-bundle: $f missing from the bundle" >&2; exit 1; }
done

t1=$SECONDS
XZ_OPT="-9 --lzma2=dict=192MiB -T1" tar -C "$stage" --owner=0 --group=0 -cJf "$archive" "$name"
pack_s=$((SECONDS - t1))
bytes=$(stat -c %s "$archive")
raw=$(du -sb "$bundle" | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "gpu-bundle: $(ls "$bundle/tests" | tr '\n' ' ')+ attnkit attnkit-bench"
echo "gpu-bundle: $archive: $(mib "$bytes") MiB ($(mib "$raw") MiB unpacked; limit ${limit_mib} MiB;" \
  "build ${build_s} s, xz ${pack_s} s)"
if ((bytes > limit_mib * 1048576)); then
  echo "gpu-bundle: FAIL: the archive is $(mib "$bytes") MiB, over the ${limit_mib} MiB limit" >&2
  exit 1
fi
cat << EOF

Bundle ready ($(cat "$bundle/COMMIT")). Through the device tool, one call (budgets: 8 minutes):
  run(command="(tar -xJf .gpu/$name.tar.xz -C /tmp || python3 -m tarfile -e .gpu/$name.tar.xz /tmp) && bash /tmp/$name/run-gpu.sh all",
      carry=[".gpu/$name.tar.xz"], timeout_s=600)
  (or "... run-gpu.sh tests" / "... run-gpu.sh bench" for a second call)
EOF
