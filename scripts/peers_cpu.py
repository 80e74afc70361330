#!/usr/bin/env python3
"""CPU peers for attnkit's CPU path (issue 18), at the shapes of its CPU benches, same thread
count, median of repeated runs: PyTorch's CPU SDPA for flash (FLOPs counted as attnkit counts
them: 4 * heads * head_dim * visible query-key pairs) and for decode (grouped, GiB/s of K+V),
a chunked torch Lightning Attention-2 (FLOPs as benches/lightning.rs counts them) and Monarch as
two torch.bmm with the permutation between them (shape.flops).

Not run in CI (PyTorch is large). To run it on the machine the README's CPU table comes from:

    python3 -m venv /tmp/tenv
    /tmp/tenv/bin/pip install torch numpy   # PyPI's wheel pulls the CUDA libraries it imports
    /tmp/tenv/bin/python scripts/peers_cpu.py --threads 2
    cargo bench --bench flash -- flash_cpu/  # attnkit at the same shapes, likewise
    cargo bench --bench decode -- decode_cpu/
    cargo bench --bench lightning -- cpu_
    cargo bench --bench monarch -- monarch_cpu/

It prints one line per case: name, median seconds, GFLOP/s or GiB/s (JSON with --json).
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
    return timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)


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
    return timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)


# (name as in benches/lightning.rs, dtype, heads, seq, head dim); causal, decay per head.
LIGHTNING_CASES = [
    ("f32_h8_d64_seq4096", torch.float32, 8, 4096, 64),
]
LIGHTNING_BLOCK = 64


def lightning_flops(heads, seq, d, e=None, block=LIGHTNING_BLOCK):
    """As benches/lightning.rs counts it: whole-block intra products, inter read, state update."""
    e = d if e is None else e
    return float(seq * heads * (2 * block * d + 2 * block * e + 4 * d * e))


def lightning_chunked(q, k, v, lam, block=LIGHTNING_BLOCK):
    """The chunked (block-split) form in plain torch: q, k, v [h, n, d], lam [h] in (0, 1]."""
    h, n, d = q.shape
    e = v.shape[-1]
    idx = torch.arange(block, dtype=q.dtype)
    diff = idx[:, None] - idx[None, :]
    mask = torch.where(diff >= 0, lam[:, None, None] ** diff.clamp(min=0), 0.0)  # [h, B, B]
    q_decay = (lam[:, None] ** (idx + 1))[..., None]  # [h, B, 1]
    k_decay = (lam[:, None] ** (block - 1 - idx))[..., None]
    block_decay = (lam ** block)[:, None, None]
    state = torch.zeros(h, d, e, dtype=q.dtype)
    out = torch.empty(h, n, e, dtype=q.dtype)
    for i in range(0, n, block):
        qi, ki, vi = q[:, i:i + block], k[:, i:i + block], v[:, i:i + block]
        intra = torch.bmm(torch.bmm(qi, ki.transpose(1, 2)) * mask, vi)
        out[:, i:i + block] = torch.baddbmm(intra, qi * q_decay, state)
        state = torch.baddbmm(state * block_decay, (ki * k_decay).transpose(1, 2), vi)
    return out


def time_lightning(dtype, heads, seq, d, reps):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(heads, seq, d, generator=gen).to(dtype) * 0.1 for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
    lam = torch.exp(-slopes).to(dtype)
    return timed(lambda: lightning_chunked(q, k, v, lam), reps)


# (name as in benches/monarch.rs, dtype, n, blocks, tokens); square blocks, y = M x.
MONARCH_CASES = [
    ("f32_n4096_b64_t1024", torch.float32, 4096, 64, 1024),
    ("bf16_n1024_b32_t4096", torch.bfloat16, 1024, 32, 4096),
]


def monarch_two_bmm(x, w1, w2):
    """y = M x as two batched matmuls with the permutation between them, in attnkit's
    convention: h[i*q + c] = w1[i] x[i*p:]; y[t*l + j] = w2[j] h[j::l]."""
    tokens = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    h = torch.bmm(x.view(tokens, k, p).transpose(0, 1), w1.transpose(1, 2))  # [k, t, q]
    h = h.transpose(0, 1).reshape(tokens, r, l).permute(2, 0, 1)  # [l, t, r]
    y = torch.bmm(h, w2.transpose(1, 2))  # [l, t, s]
    return y.permute(1, 2, 0).reshape(tokens, s * l)


def time_monarch(dtype, n, blocks, tokens, reps):
    gen = torch.Generator().manual_seed(0)
    b = n // blocks
    w1, w2 = (torch.randn(blocks, b, b, generator=gen).to(dtype) * 0.1 for _ in range(2))
    x = torch.randn(tokens, n, generator=gen).to(dtype)
    return timed(lambda: monarch_two_bmm(x, w1, w2), reps)


def timed(fn, reps):
    """Median seconds of `reps` runs of fn() after one warm-up, without autograd."""
    with torch.inference_mode():
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {args.threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    for name, dtype, heads, seq, d, causal in FLASH_CASES:
        if args.only not in name:
            continue
        t = time_sdpa(dtype, heads, seq, d, causal, args.reps)
        gflops = flash_flops(heads, seq, d, causal) / t / 1e9
        if args.json:
            print(json.dumps({"case": f"flash_cpu/{name}", "peer": "torch_sdpa", "s": t,
                              "gflops": gflops}))
        else:
            print(f"flash_cpu/{name:28s} torch SDPA {t * 1e3:8.2f} ms {gflops:7.1f} GFLOP/s")
    for name, dtype, hq, hkv, cache in DECODE_CASES:
        if args.only not in name:
            continue
        t = time_decode(dtype, hq, hkv, cache, args.reps)
        # K + V bytes read, in GiB/s as criterion prints them.
        gib = 2 * cache * hkv * 128 * (4 if dtype == torch.float32 else 2) / t / 2**30
        if args.json:
            print(json.dumps({"case": f"decode_cpu/{name}", "peer": "torch_sdpa_gqa", "s": t,
                              "gib_s": gib}))
        else:
            print(f"decode_cpu/{name:27s} torch SDPA {t * 1e3:8.2f} ms {gib:7.2f} GiB/s")
    for name, dtype, heads, seq, d in LIGHTNING_CASES:
        if args.only not in name:
            continue
        t = time_lightning(dtype, heads, seq, d, args.reps)
        report(args, f"lightning_forward/cpu_{name}", "torch_chunked",
               t, lightning_flops(heads, seq, d))
    for name, dtype, n, blocks, tokens in MONARCH_CASES:
        if args.only not in name:
            continue
        t = time_monarch(dtype, n, blocks, tokens, args.reps)
        # shape.flops(tokens): 2 * tokens * (k q p + l s r) = 4 * tokens * n * (n / blocks).
        report(args, f"monarch_cpu/{name}", "torch_two_bmm", t,
               4.0 * tokens * n * (n // blocks))


def report(args, case, peer, t, flops):
    gflops = flops / t / 1e9
    if args.json:
        print(json.dumps({"case": case, "peer": peer, "s": t, "gflops": gflops}))
    else:
        print(f"{case:40s} {peer} {t * 1e3:8.2f} ms {gflops:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
