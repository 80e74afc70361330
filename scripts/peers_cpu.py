#!/usr/bin/env python3
"""CPU peers for attnkit's CPU path (issue 18): PyTorch's CPU SDPA at the shapes of
`cargo bench --bench flash -- flash_cpu`, same thread count, FLOPs counted as attnkit counts
them (4 * heads * head_dim * visible query-key pairs), median of interleaved rounds.

Not run in CI (PyTorch is large). To run it on the machine the README's CPU table comes from:

    python3 -m venv /tmp/tenv
    /tmp/tenv/bin/pip install torch numpy   # or: pip download --no-deps torch, then install it
    /tmp/tenv/bin/python scripts/peers_cpu.py --threads 2
    cargo bench --bench flash -- flash_cpu/  # attnkit at the same shapes

It prints one line per case: name, median seconds, GFLOP/s (JSON with --json).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# (name as in benches/flash.rs, dtype, heads, seq, head dim, causal)
FLASH_CASES = [
    ("f32_h8_s1024_d64_causal", torch.float32, 8, 1024, 64, True),
    ("f32_h8_s1024_d128", torch.float32, 8, 1024, 128, False),
    ("bf16_h8_s1024_d128", torch.bfloat16, 8, 1024, 128, False),
    ("bf16_h8_s4096_d64_causal", torch.bfloat16, 8, 4096, 64, True),
]


def flash_flops(heads, seq, d, causal):
    pairs = seq * (seq + 1) // 2 if causal else seq * seq
    return 4.0 * heads * d * pairs


def time_sdpa(dtype, heads, seq, d, causal, reps):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, d, generator=gen).to(dtype) for _ in range(3))
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# (name as in benches/decode.rs, dtype, query heads, KV heads, cache length); head dim 128,
# batch 1, one new token.
DECODE_CASES = [
    ("f32_hq32_hkv8_d128_c32768", torch.float32, 32, 8, 32768),
    ("bf16_hq32_hkv8_d128_c4096", torch.bfloat16, 32, 8, 4096),
]


def time_decode(dtype, hq, hkv, cache, reps, d=128):
    """SDPA's grouped decode (enable_gqa) on its natural [b, h, s, d] cache layout."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
    k, v = (torch.randn(1, hkv, cache, d, generator=gen).to(dtype) for _ in range(2))
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {args.threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    for name, dtype, heads, seq, d, causal in FLASH_CASES:
        t = time_sdpa(dtype, heads, seq, d, causal, args.reps)
        gflops = flash_flops(heads, seq, d, causal) / t / 1e9
        if args.json:
            print(json.dumps({"case": f"flash_cpu/{name}", "peer": "torch_sdpa", "s": t,
                              "gflops": gflops}))
        else:
            print(f"flash_cpu/{name:28s} torch SDPA {t * 1e3:8.2f} ms {gflops:7.1f} GFLOP/s")
    for name, dtype, hq, hkv, cache in DECODE_CASES:
        t = time_decode(dtype, hq, hkv, cache, args.reps)
        # K + V bytes read, in GiB/s as criterion prints them.
        gib = 2 * cache * hkv * 128 * (4 if dtype == torch.float32 else 2) / t / 2**30
        if args.json:
            print(json.dumps({"case": f"decode_cpu/{name}", "peer": "torch_sdpa_gqa", "s": t,
                              "gib_s": gib}))
        else:
            print(f"decode_cpu/{name:27s} torch SDPA {t * 1e3:8.2f} ms {gib:7.2f} GiB/s")


if __name__ == "__main__":
    main()
