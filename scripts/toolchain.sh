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

have_libclang() {
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && return 0
  compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' > /dev/null
}
if have_libclang; then
  echo "toolchain: libclang present"
else
  echo "toolchain: installing libclang-dev (for bindgen)"
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libclang-dev > /dev/null
  have_libclang || { echo "toolchain: libclang still not found after install" >&2; exit 1; }
fi
