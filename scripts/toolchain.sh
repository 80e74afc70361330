#!/usr/bin/env bash
# Installs what building attnkit's CUDA kernels needs, without a CUDA toolkit:
#   - nvcc 13.0 from NVIDIA's PyPI wheels into .toolchain/cuda (git-ignored), where build.rs
#     looks for it last;
#   - libclang (Debian libclang-dev) for bindgen, through apt, when it is missing.
# Idempotent: a second run with the same pins does nothing. A user with a real CUDA toolkit
# (nvcc on PATH or CUDA_HOME) and libclang needs none of this.
#
# All five wheels are pinned: pinning only nvcc pulls a newer nvvm that emits PTX ISA 9.5,
# which the R580 driver (CUDA 13.0) rejects at load time; without cccl, cuda_bf16.h fails on
# <nv/target>.
set -euo pipefail

# What bindgen (clang-sys) dlopens is libclang.so, libclang-<N>.so or libclang.so.<N>: never
# libclang-cpp (the C++ library, a different ABI). `libclang_in` picks those names out of a
# listing of paths on stdin (ldconfig -p lines or file paths) and prints the first; the
# toolchain test feeds it listings that hold only libclang-cpp.
libclang_in() {
  grep -oE '/[^ ]*/libclang(-[0-9][0-9.]*)?\.so(\.[0-9][0-9.]*)?$' | grep -v 'libclang-cpp' | head -n 1
}
find_libclang() {
  {
    [[ -n "${LIBCLANG_PATH:-}" ]] && ls -1 "$LIBCLANG_PATH"/libclang* 2>/dev/null
    ldconfig -p 2>/dev/null | sed 's/.*=> //'
    ls -1 /usr/lib/llvm-*/lib/libclang* /usr/lib/x86_64-linux-gnu/libclang* \
      /usr/lib/aarch64-linux-gnu/libclang* /usr/lib64/libclang* 2>/dev/null
    true # a missing directory above is no failure: the listing decides
  } | libclang_in || true
}
if [[ "${1:-}" == "--libclang-in" ]]; then libclang_in || true; exit 0; fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.toolchain/cuda"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp="$dest/.attnkit-pins"
nvcc="$dest/nvidia/cu13/bin/nvcc"

if [[ -x "$nvcc" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  echo "toolchain: nvcc already installed ($nvcc)"
else
  echo "toolchain: installing ${pins[*]} into $dest"
  rm -rf "$dest"
  mkdir -p "$dest"
  python3 -m pip install --quiet --no-deps --root-user-action=ignore --disable-pip-version-check --target "$dest" "${pins[@]}"
  echo "${pins[*]}" > "$stamp"
fi
"$nvcc" --version | tail -n 2

lib=$(find_libclang)
if [[ -n "$lib" ]]; then
  echo "toolchain: libclang for bindgen: $lib"
else
  echo "toolchain: no libclang.so for bindgen (libclang-cpp does not count); installing libclang-dev"
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libclang-dev > /dev/null
  lib=$(find_libclang)
  [[ -n "$lib" ]] || {
    echo "toolchain: libclang still not found after installing libclang-dev: bindgen cannot run" >&2
    exit 1
  }
  echo "toolchain: libclang for bindgen: $lib"
fi
