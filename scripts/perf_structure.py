#!/usr/bin/env python3
"""Renders scripts/perf-structure.sh's results as a Markdown table (stdout).

    perf_structure.py OUT_DIR PTXAS_LOG FLASH_H

OUT_DIR holds one FAMILY__CASE.jsonl per case (the emulator's per-launch counters) and
FAMILY__CASE.result (the bench binary's line, with the shape). PTXAS_LOG is the build script's
output with ptxas' -v lines. FLASH_H gives the flash forward's key tile, so barriers can be
counted per key tile. Proxies, not timings.
"""

import collections
import json
import math
import pathlib
import re
import sys

# Per-SM limits of sm_90 (H100/H200): registers, threads, CTAs, shared bytes, reserved per CTA.
SM90 = dict(regs=65536, threads=2048, ctas=32, shared=233472, reserved=1024)


def ptxas(path):
    """{(kernel, arch): (registers, spill bytes)} from ptxas -v lines."""
    out, fn, arch = {}, None, None
    for line in pathlib.Path(path).read_text().splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            fn, arch = m.group(1), m.group(2)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn:
            out.setdefault((fn, arch), [0, 0])[1] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and fn:
            out.setdefault((fn, arch), [0, 0])[0] = int(m.group(1))
    return out


def defines(path):
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define (ATTNKIT_\w+) (\d+)", pathlib.Path(path).read_text())
    }


def flash_tile(h, d):
    """(query rows per CTA, keys per tile) of the bf16 forward, as src/flash/cuda.rs picks
    (kernels/flash.h before v3 had no row tiles and one key tile up to d = 128)."""
    if d == 256:
        return 16 * h["ATTNKIT_FLASH_WARPS_D256"], h["ATTNKIT_FLASH_BLOCK_N_D256"]
    if d == 192:
        return 16 * h["ATTNKIT_FLASH_WARPS_D192"], h["ATTNKIT_FLASH_BLOCK_N_D192"]
    rows = 16 * h.get("ATTNKIT_FLASH_ROW_TILES_SMALL_D", 1) * h["ATTNKIT_FLASH_WARPS_SMALL_D"]
    keys = h["ATTNKIT_FLASH_BLOCK_N_SMALL_D"]
    if d > 64 and "ATTNKIT_FLASH_BLOCK_N_MID_D" in h:
        keys = h["ATTNKIT_FLASH_BLOCK_N_MID_D"]
    return rows, keys


def key_tiles(shape, rows, keys):
    """Key tiles the forward's CTAs visit in all (causal: up to each block's last row)."""
    sq, sk = shape["seq_q"], shape["seq_k"]
    diag = sk - sq
    total = 0
    for m0 in range(0, sq, rows):
        last = min(sk, m0 + rows + diag) if shape["causal"] else sk
        total += math.ceil(max(last, 0) / keys)
    return total * shape["batch"] * shape["heads_q"]


def occupancy(regs, threads, shared):
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = SM90["regs"] // (per_warp * warps) if regs else SM90["ctas"]
    by_threads = SM90["threads"] // (warps * 32)
    by_shared = SM90["shared"] // (shared + SM90["reserved"])
    return min(by_regs, by_threads, by_shared, SM90["ctas"])


def main():
    out, log, flash_h = sys.argv[1:4]
    regs = ptxas(log)
    h = defines(flash_h)
    print(
        "| case | kernel | regs sm_80 / sm_90a (spills) | CTAs/SM (sm_90) "
        "| warp instructions/CTA | barriers/CTA | barriers/key tile | smem B per MMA FLOP "
        "| bank conflicts per smem access | global requests/CTA | sectors per global request |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for res in sorted(pathlib.Path(out).glob("*.result")):
        result = json.loads(res.read_text().strip().splitlines()[-1])
        case = f'{result["family"]}/{result["case"]}'
        if result["status"] != "ok":
            print(f"| {case} | {result['status']} | | | | | | | | | |")
            continue
        sums = collections.OrderedDict()
        for line in res.with_suffix(".jsonl").read_text().splitlines():
            r = json.loads(line)
            s = sums.setdefault(r["kernel"], collections.Counter())
            s.update({k: v for k, v in r.items() if isinstance(v, int)})
            s["threads"] = math.prod(r["block"])
            s["launches"] += 1
        for kernel, s in sums.items():
            r80 = regs.get((kernel, "sm_80"), [0, 0])
            r90 = regs.get((kernel, "sm_90a"), [0, 0])
            spills = r80[1] + r90[1]
            occ = occupancy(r90[0], s["threads"], s["shared"] // max(s["launches"], 1))
            per_tile = ""
            if result["family"] == "flash" and kernel.startswith("flash_fwd_"):
                rows, keys = flash_tile(h, result["head_dim"])
                per_tile = f'{s["barriers"] / key_tiles(result, rows, keys):.2f}'
            flops = s["mma"] * 4096
            smem_per_flop = f'{s["shared_bytes"] / flops:.3f}' if flops else "(no mma)"
            conflicts = (
                (s["shared_wavefronts"] - s["shared_ideal_wavefronts"]) / s["shared_requests"]
                if s["shared_requests"]
                else 0
            )
            sectors = s["global_sectors"] / s["global_requests"] if s["global_requests"] else 0
            print(
                f"| {case} | `{kernel}` | {r80[0]} / {r90[0]} ({spills} B) | {occ} "
                f'| {s["warp_instructions"] / s["ctas"]:.0f} '
                f'| {s["barriers"] / s["ctas"]:.1f} | {per_tile} | {smem_per_flop} '
                f'| {conflicts:.2f} | {s["global_requests"] / s["ctas"]:.0f} | {sectors:.1f} |'
            )


if __name__ == "__main__":
    main()
