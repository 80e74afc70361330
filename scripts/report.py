#!/usr/bin/env python3
"""Merges attnkit-bench's results and the peers' (JSON lines from one GPU call) into one
markdown report and one PNG plot per family.

    python3 scripts/report.py --ours ours.jsonl --peers peers.jsonl --out DIR \
        [--commit SHA] [--command "..."]

Prints exactly what was measured: a failed or skipped case says so. The two inputs must come
from the same call on the same device (checked: the device names must agree).
"""
import argparse
import datetime
import json
import os
import sys
from collections import OrderedDict


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--peers", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    ours, peers = load(args.ours), load(args.peers)
    ceil = {r["impl"]: r for r in ours + peers if r.get("kind") == "ceilings"}
    devices = {r["device"] for r in ours + peers if r.get("kind") in ("ceilings", "result") and r.get("device") not in (None, "unknown")}
    if len(devices) > 1:
        sys.exit(f"refusing to merge results from different devices: {sorted(devices)}")
    device = devices.pop() if devices else "no GPU"
    os.makedirs(args.out, exist_ok=True)

    # family -> case -> impl -> result
    table = OrderedDict()
    for r in ours + peers:
        if r.get("kind") != "result":
            continue
        table.setdefault(r["family"], OrderedDict()).setdefault(r["case"], OrderedDict())[r["impl"]] = r

    lines = [
        f"# Benchmark report: {device}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: `{args.commit}`",
        f"- command: `{args.command}`" if args.command else "- command: (not given)",
        f"- ceilings: copy {fmt(ceil.get('attnkit', {}).get('copy_gbps'), 0)} GB/s (attnkit-bench), "
        f"{fmt(ceil.get('peers', {}).get('copy_gbps'), 0)} GB/s (torch); dense bf16 matmul "
        f"{fmt(ceil.get('peers', {}).get('matmul_tflops'), 0)} TFLOP/s (torch, cuBLAS)",
        "",
        "Rates are TFLOP/s for compute-bound families and GB/s for memory-bound ones; "
        "`ratio` is attnkit's rate over the best peer's (above 1: attnkit faster).",
        "",
    ]
    for fam, cases in table.items():
        impls = []
        for c in cases.values():
            for i in c:
                if i not in impls:
                    impls.append(i)
        peers_ = [i for i in impls if i != "attnkit"]
        lines += [f"## {fam}", "", "| case | " + " | ".join(impls) + " | ratio |", "|---" * (len(impls) + 2) + "|"]
        for case, by_impl in cases.items():
            cells = []
            for i in impls:
                r = by_impl.get(i)
                if r is None:
                    cells.append("not run")
                elif r["status"] != "ok":
                    cells.append(r["status"].split(":")[0])
                else:
                    rate = r["tflops"] if r["tflops"] is not None else r["gbps"]
                    cells.append(f"{fmt(rate)} ({fmt(r['median_ms'], 3)} ms)")
            best = max((rate_of(by_impl[p]) for p in peers_ if p in by_impl and by_impl[p]["status"] == "ok"), default=None)
            mine = rate_of(by_impl["attnkit"]) if "attnkit" in by_impl and by_impl["attnkit"]["status"] == "ok" else None
            ratio = f"{mine / best:.2f}" if mine and best else "-"
            lines.append(f"| {case} | " + " | ".join(cells) + f" | {ratio} |")
        failures = [(c, i, r["status"]) for c, by in cases.items() for i, r in by.items() if r["status"] != "ok"]
        if failures:
            lines += ["", "Not measured:"] + [f"- {c} / {i}: {s}" for c, i, s in failures]
        lines.append("")
        plot(fam, cases, impls, os.path.join(args.out, f"{fam}.png"), device, lines)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def rate_of(r):
    return r["tflops"] if r.get("tflops") is not None else r.get("gbps")


def plot(fam, cases, impls, path, device, lines):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines.append(f"(no plot for {fam}: matplotlib is not installed here)")
        return
    names = list(cases)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    unit = "TFLOP/s"
    for i in impls:
        ys = []
        for c in names:
            r = cases[c].get(i)
            ok = r is not None and r["status"] == "ok"
            ys.append(rate_of(r) if ok else float("nan"))
            if ok and r.get("tflops") is None:
                unit = "GB/s"
        ax.plot(range(len(names)), ys, marker="o", label=i)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title(f"{fam} on {device}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    lines.append(f"![{fam}]({os.path.basename(path)})")
    lines.append("")


if __name__ == "__main__":
    main()
