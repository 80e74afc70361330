#!/usr/bin/env python3
"""Times the peers of attnkit's kernels at exactly the cases `attnkit-bench --list` prints.

Same method as attnkit-bench: CUDA events around each run, warm-up first, the median of the
timed runs, inputs rotated when a case's working set would fit in the L2. One JSON line per
(case, peer), with the same fields as attnkit-bench's results, and a `ceilings` line first
(dense bf16 matmul TFLOP/s through cuBLAS, device copy GB/s counting read + write).

    attnkit-bench --list > cases.jsonl
    python3 scripts/peers.py --cases cases.jsonl [--dry-run] > peers.jsonl

--dry-run parses the table and prints the plan without importing torch (no GPU needed).
Peers: torch SDPA (FLASH_ATTENTION and CUDNN_ATTENTION backends) for flash; fla's
chunk_simple_gla with a fixed g_gamma and scale=1.0 (and chunk_lightning_attn where present)
for lightning; the two-bmm Monarch reference and dense torch.matmul for monarch (forward, and
autograd's backward for monarch_backward).
"""
import argparse
import json
import sys

RUNS = 20
WARMUP = 3
L2_BYTES = 64 << 20  # rotate inputs below this working set (H100 L2: 50 MB)


def peers_for(case):
    """Names of the peers a case is measured against."""
    fam = case["family"]
    if fam in ("flash", "flash_backward"):
        return ["torch-sdpa-flash", "torch-sdpa-cudnn"]
    if fam == "decode":
        return ["torch-sdpa-flash", "torch-sdpa-cudnn", "torch-sdpa-efficient"]
    if fam == "lightning":
        return ["fla-chunk_simple_gla", "fla-chunk_lightning_attn"]
    if fam == "monarch":
        return ["torch-two-bmm", "torch-dense-matmul"]
    if fam == "monarch_backward":
        return ["torch-two-bmm", "torch-dense-matmul"]
    if fam == "selftest":
        return ["torch-mul"]
    return []  # flash_variants: SDPA has no windows, sinks, relu² or entropy output


def emit(obj):
    print(json.dumps(obj), flush=True)


def result(case, impl, device, ms=None, tflops=None, gbps=None, frac=None, status="ok"):
    line = {k: v for k, v in case.items() if k != "kind"}
    line.update(kind="result", impl=impl, device=device, median_ms=ms, tflops=tflops, gbps=gbps,
                frac_ceiling=frac, status=status)
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", required=True, help="JSON lines from attnkit-bench --list")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; import nothing")
    args = ap.parse_args()
    cases = []
    with open(args.cases) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if obj.get("kind") != "case" or "family" not in obj or "case" not in obj:
                sys.exit(f"{args.cases}:{n}: not a case line: {line[:80]}")
            cases.append(obj)
    if args.dry_run:
        for c in cases:
            emit({"kind": "plan", "family": c["family"], "case": c["case"], "peers": peers_for(c)})
        print(f"dry run: {len(cases)} cases, {sum(len(peers_for(c)) for c in cases)} peer timings",
              file=sys.stderr)
        return
    run_all(cases)


def run_all(cases):
    import torch

    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)

    def time_ms(fns):
        """Median ms of fns[i % len(fns)]() over RUNS, after WARMUP, each run between events."""
        for i in range(WARMUP):
            fns[i % len(fns)]()
        events = []
        for i in range(RUNS):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fns[i % len(fns)]()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in events)
        return ms[len(ms) // 2]

    def copies(nbytes):
        """How many input sets to rotate so the L2 never serves a repeat."""
        return 1 if nbytes >= L2_BYTES else min(8, L2_BYTES // max(nbytes, 1) + 1)

    # Ceilings, measured here in the same call.
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_ms = time_ms([lambda: torch.matmul(a, b)])
    matmul_tflops = 2 * 8192**3 / mm_ms / 1e9
    src = torch.empty(1 << 28, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    cp_ms = time_ms([lambda: dst.copy_(src)])
    copy_gbps = 2 * src.numel() * 4 / cp_ms / 1e6
    del a, b, src, dst
    emit({"kind": "ceilings", "impl": "peers", "device": device, "copy_gbps": copy_gbps,
          "matmul_tflops": matmul_tflops, "torch": torch.__version__})

    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    for c in cases:
        for impl in peers_for(c):
            try:
                fns, work, unit = build(torch, dev, dtypes, c, impl, copies)
                ms = time_ms(fns)
                rate = work / ms / 1e9
                if unit == "tflops":
                    emit(result(c, impl, device, ms, tflops=rate, frac=rate / matmul_tflops))
                else:
                    emit(result(c, impl, device, ms, gbps=rate * 1e3, frac=rate * 1e3 / copy_gbps))
            except Exception as e:  # a peer that cannot run says so, the rest go on
                emit(result(c, impl, device, status=f"failed: {type(e).__name__}: {e}"[:300]))
            torch.cuda.empty_cache()


def build(torch, dev, dtypes, c, impl, copies):
    """Returns (list of zero-arg callables to rotate, work per call, unit) for one peer."""
    fam = c["family"]
    dt = dtypes[c.get("dtype", "bf16")]
    if fam in ("flash", "flash_backward"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        b, sq, sk, hq, hk, d = (c[x] for x in ("batch", "seq_q", "seq_k", "heads_q", "heads_kv", "head_dim"))
        causal = c["causal"]
        nbytes = 2 * (b * sq * hq * d * 2 + b * sk * hk * d * 2)
        sets = []
        for _ in range(copies(nbytes)):
            # attnkit's layout [b, s, h, d], viewed as SDPA's [b, h, s, d].
            q = torch.randn(b, sq, hq, d, device=dev, dtype=dt).transpose(1, 2)
            k = torch.randn(b, sk, hk, d, device=dev, dtype=dt).transpose(1, 2)
            v = torch.randn(b, sk, hk, d, device=dev, dtype=dt).transpose(1, 2)
            sets.append((q, k, v))
        backend = SDPBackend.FLASH_ATTENTION if impl == "torch-sdpa-flash" else SDPBackend.CUDNN_ATTENTION
        gqa = hq != hk

        def make(q, k, v):
            def f():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            return f

        def make_backward(q, k, v):
            # The forward once, outside the timing; each call runs only the backward (as
            # attnkit's case, which is given o and the LSE).
            q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            grad = torch.randn_like(out)

            def f():
                with sdpa_kernel(backend):
                    torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
            return f

        fns = [(make if fam == "flash" else make_backward)(*s) for s in sets]
        fns[0]()  # raises here if the backend refuses the shape
        pairs = sq * sk
        if causal:
            diag = sk - sq
            pairs = sum(max(0, min(sk, i + diag + 1)) for i in range(sq))
        # The backward: 2.5x the forward's FLOPs (FlashAttention's convention).
        return fns, (4 if fam == "flash" else 10) * b * hq * d * pairs, "tflops"
    if fam == "decode":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        b, sq, n, hq, hk, d = (c[x] for x in ("batch", "seq_q", "cache", "heads_q", "heads_kv", "head_dim"))
        backend = {"torch-sdpa-flash": SDPBackend.FLASH_ATTENTION, "torch-sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                   "torch-sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[impl]
        nbytes = 2 * b * n * hk * d * 2
        sets = []
        for _ in range(copies(nbytes)):
            q = torch.randn(b, sq, hq, d, device=dev, dtype=dt).transpose(1, 2)
            k = torch.randn(b, n, hk, d, device=dev, dtype=dt).transpose(1, 2)
            v = torch.randn(b, n, hk, d, device=dev, dtype=dt).transpose(1, 2)
            sets.append((q, k, v))

        def make(q, k, v):
            def f():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk)
            return f

        fns = [make(*s) for s in sets]
        fns[0]()
        return fns, nbytes, "gbps"
    if fam == "lightning":
        b, t, h, dk, dv = (c[x] for x in ("batch", "seq", "heads", "d", "e"))
        slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=dev, dtype=torch.float32)
        nbytes = b * t * h * (2 * dk + 2 * dv) * 2
        sets = [tuple(torch.randn(b, t, h, x, device=dev, dtype=dt) for x in (dk, dk, dv)) for _ in range(copies(nbytes))]
        if impl == "fla-chunk_simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla

            fns = [(lambda q, k, v: lambda: chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0))(*s) for s in sets]
        else:
            from fla.ops.lightning_attn import chunk_lightning_attn

            fns = [(lambda q, k, v: lambda: chunk_lightning_attn(q, k, v, layer_idx=0, num_layers=1, scale=1.0))(*s) for s in sets]
        fns[0]()
        return fns, nbytes, "gbps"
    if fam in ("monarch", "monarch_backward"):
        tokens, k_, q_, p_, l_, s_, r_ = (c[x] for x in ("tokens", "k", "q", "p", "l", "s", "r"))
        backward = fam == "monarch_backward"
        n_in, n_out = k_ * p_, l_ * s_
        x_bytes = tokens * (n_in + n_out) * 2
        sets = []
        for _ in range(copies(x_bytes)):
            sets.append(torch.randn(tokens, n_in, device=dev, dtype=dt))
        if impl == "torch-two-bmm":
            # fly's blockdiag_butterfly_multiply, written out: two batched matmuls and the
            # permutation between them (the HBM round trip attnkit's fused kernel avoids).
            params = [torch.randn(k_, q_, p_, device=dev, dtype=dt), torch.randn(l_, s_, r_, device=dev, dtype=dt)]

            def fwd(x, w1, w2):
                h = torch.bmm(x.reshape(tokens, k_, p_).transpose(0, 1), w1.transpose(-1, -2))  # (k, T, q)
                h = h.transpose(0, 1).reshape(tokens, r_, l_).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, T, r)
                y = torch.bmm(h, w2.transpose(-1, -2))  # (l, T, s)
                return y.permute(1, 2, 0).reshape(tokens, s_ * l_)

            flops = 2 * tokens * (k_ * q_ * p_ + l_ * s_ * r_)
        else:
            params = [torch.randn(n_in, n_out, device=dev, dtype=dt)]

            def fwd(x, dense):
                return torch.matmul(x, dense)

            flops = 2 * tokens * n_in * n_out
        if not backward:
            fns = [(lambda x: lambda: fwd(x, *params))(x) for x in sets]
        else:
            # The forward once, outside the timing; each call runs only the backward: dx and
            # the weights' gradients, as attnkit's case. FLOPs: twice the forward's (dx, and the
            # weight gradients), attnkit's convention.
            params = [w.requires_grad_(True) for w in params]

            def make_backward(x):
                x = x.detach().requires_grad_(True)
                out = fwd(x, *params)
                grad = torch.randn_like(out)
                return lambda: torch.autograd.grad(out, [x] + params, grad, retain_graph=True)

            fns = [make_backward(x) for x in sets]
            flops *= 2
        fns[0]()
        if c.get("bound") == "memory":
            # Same bytes as attnkit-bench counts: x, y and both Monarch weights.
            nbytes = (tokens * (n_in + n_out) + k_ * q_ * p_ + l_ * s_ * r_) * 2
            return fns, nbytes, "gbps"
        return fns, flops, "tflops"
    if fam == "selftest":
        n = c["n"]
        x = torch.randn(n, device=dev, dtype=dt)
        y = torch.empty_like(x)
        # One elementwise pass (read x, write y), like attnkit's scale.
        return [lambda: torch.mul(x, 2.0, out=y)], 2 * n * x.element_size(), "gbps"
    raise ValueError(f"no peer for family {fam}")


if __name__ == "__main__":
    main()
