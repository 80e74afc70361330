#!/usr/bin/env bash
# Tests scripts/toolchain.sh's libclang detection (`toolchain.sh --libclang-in` reads a listing
# on stdin and prints the libclang that bindgen would load, or nothing). The case that broke CI
# on a fresh machine: only libclang-cpp (the C++ library, which bindgen cannot use) installed,
# and the old check took it for libclang. CI runs this before the toolchain step.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fails=0

# expect NAME WANT LISTING: the detection prints WANT (empty: nothing) for LISTING.
expect() {
  local name="$1" want="$2" listing="$3" got
  got=$(printf '%s\n' "$listing" | "$here/toolchain.sh" --libclang-in)
  if [[ "$got" == "$want" ]]; then
    echo "ok   $name"
  else
    echo "FAIL $name: want '${want:-<nothing>}', got '${got:-<nothing>}'"
    fails=$((fails + 1))
  fi
}

x86=/usr/lib/x86_64-linux-gnu

# Only libclang-cpp: nothing bindgen can load, in either form of listing.
expect "libclang-cpp path only" "" "$x86/libclang-cpp.so.14"
expect "libclang-cpp paths, several versions" "" \
  "$x86/libclang-cpp.so.14
/usr/lib/llvm-14/lib/libclang-cpp.so.14
/usr/lib/llvm-15/lib/libclang-cpp.so
/usr/lib/llvm-15/lib/libclang-cpp.so.15"
expect "ldconfig -p, libclang-cpp only" "" \
  "	libclang-cpp.so.14 (libc6,x86-64) => $x86/libclang-cpp.so.14
	libclang-cpp.so (libc6,x86-64) => $x86/libclang-cpp.so"
expect "empty listing" "" ""
expect "other libraries only" "" \
  "	libc.so.6 (libc6,x86-64) => $x86/libc.so.6
	libclangBasic.a => /usr/lib/llvm-14/lib/libclangBasic.a"

# What bindgen loads: libclang.so, libclang-<N>.so(.<M>), libclang.so.<N>.
expect "libclang-14.so.1 path" "$x86/libclang-14.so.1" "$x86/libclang-14.so.1"
expect "libclang.so path" "/usr/lib/llvm-14/lib/libclang.so" "/usr/lib/llvm-14/lib/libclang.so"
expect "libclang.so.14 path" "/usr/lib/llvm-14/lib/libclang.so.14" \
  "/usr/lib/llvm-14/lib/libclang.so.14"
expect "ldconfig -p, libclang-14.so.1" "$x86/libclang-14.so.1" \
  "	libclang-14.so.1 (libc6,x86-64) => $x86/libclang-14.so.1"
expect "ldconfig -p, libclang-cpp listed first" "$x86/libclang-14.so.1" \
  "	libclang-cpp.so.14 (libc6,x86-64) => $x86/libclang-cpp.so.14
	libclang-14.so.1 (libc6,x86-64) => $x86/libclang-14.so.1"
expect "paths, libclang-cpp listed first" "/usr/lib/llvm-14/lib/libclang.so" \
  "/usr/lib/llvm-14/lib/libclang-cpp.so.14
/usr/lib/llvm-14/lib/libclang.so"

if ((fails > 0)); then
  echo "test-toolchain: $fails case(s) failed" >&2
  exit 1
fi
echo "test-toolchain: libclang detection ok"
