// Lightning Attention-2 (arXiv 2401.04658), forward, in the chunked form that keeps a long
// sequence with few heads spread over the GPU:
//   1. lightning_split_state: per (split, head, e tile, sequence), the split's own state
//      sum_j lambda^(n-1-j) k_j^T v_j, block by block, into the workspace;
//   2. lightning_scan: per state element, the scan over the splits of a sequence, leaving in
//      each slot the state that enters its split (and the final state);
//   3. lightning_output: per split, the paper's loop over blocks of B = 64 tokens: intra
//      [(Q_i K_i^T) (.) M] V_i and inter Lambda Q_i KV on tensor cores (mma.sync m16n8k16,
//      f32 accumulation), then KV <- lambda^n KV + (lambda^(n-1-j) K_i)^T V_i.
// Plus lightning_decode, the one-token recurrence. Every decay is exp2(n * log2_decay) with
// n >= 0 (log2_decay <= 0 from the host), so a strong decay underflows to 0, never to inf.
//
// Tiles: four warps; in the output phase warp w owns block rows [16w, 16w + 16) (scores,
// then P V and Q S into one 16 x 64 accumulator), in the state phase it owns state rows
// [w d/4, (w+1) d/4) (a d/4 x 64 accumulator). 16-bit inputs: scores P and the state copy
// used by Q S are rounded to the input type for the tensor cores (as the paper's kernel does);
// the state itself stays f32 in shared memory. f32 inputs run the same fragments in FMAs.
#include "common.cuh"
#include "lightning.h"
#include "lightning.cuh"

namespace lightning {

constexpr int BLOCK = ATTNKIT_LIGHTNING_BLOCK;
constexpr int ET = ATTNKIT_LIGHTNING_E_TILE;
constexpr int THREADS = ATTNKIT_LIGHTNING_THREADS;
static_assert(BLOCK == 16 * (THREADS / 32), "one 16-row mma tile per warp");
static_assert(ET % 8 == 0 && BLOCK % 16 == 0, "mma tile multiples");

// Shared memory of one thread block; the host mirrors these sizes (src/lightning/cuda.rs)
// and the kernels check what they were given. Rows are padded by 16 bytes so the column
// reads of the mma fragments spread over the banks; every region starts 16-byte aligned.
template <typename T, int D>
struct Smem {
    static constexpr int PAD = 16 / sizeof(T);
    static constexpr int PK = D + PAD;   // pitch of K and Q tiles [BLOCK][D]
    static constexpr int PV = ET + PAD;  // pitch of V, P [BLOCK][ET] and the state copy [D][ET]
    static constexpr int PS = ET + 8;    // pitch of the f32 state [D][ET]: 8 rows of float2 pairs on distinct banks
    static constexpr bool COPY = sizeof(T) == 2;  // 16-bit: a T copy of the state feeds Q S
    static constexpr size_t K_OFF = 0;
    static constexpr size_t V_OFF = K_OFF + sizeof(T) * BLOCK * PK;
    static constexpr size_t S_OFF = V_OFF + sizeof(T) * BLOCK * PV;
    static constexpr size_t SPLIT_BYTES = S_OFF + sizeof(float) * D * PS;
    static constexpr size_t Q_OFF = SPLIT_BYTES;
    static constexpr size_t P_OFF = Q_OFF + sizeof(T) * BLOCK * PK;
    static constexpr size_t C_OFF = P_OFF + sizeof(T) * BLOCK * PV;
    static constexpr size_t OUTPUT_BYTES = C_OFF + (COPY ? sizeof(T) * D * PV : 0);
};

__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// A mismatch between the host's and the kernel's layout would corrupt memory: stop instead
// (the launch then fails with an error the host reports).
__device__ __forceinline__ void require_smem(size_t need) {
    if (dynamic_smem_size() < need) __trap();
}

struct SeqSpan {
    int64_t start, len;
};

// Sequence n. Varlen offsets are device data the host did not read: offsets outside
// [0, total_tokens] or decreasing make an empty sequence, so no access leaves the tensors.
__device__ __forceinline__ SeqSpan seq_span(const LightningParams& p, int64_t n) {
    if (p.cu_seqlens == nullptr) return {n * p.seq_len, p.seq_len};
    const int32_t* cu = static_cast<const int32_t*>(p.cu_seqlens);
    const int64_t a = cu[n], b = cu[n + 1];
    if (a < 0 || b < a || b > p.total_tokens) return {0, 0};
    return {a, min(b - a, p.split_len * p.n_splits)};
}

// Rows [0, n) of a BLOCK x COLS tile (row r at src + r * stride), rows [n, BLOCK) zero: a
// partial block computes with its true length and the zero rows add nothing.
template <typename T, int COLS, int PITCH>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int n) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int PER_ROW = COLS / VEC;
    for (int i = threadIdx.x; i < BLOCK * PER_ROW; i += THREADS) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * VEC;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r < n) x = *reinterpret_cast<const uint4*>(src + r * stride + c);
        *reinterpret_cast<uint4*>(dst + r * PITCH + c) = x;
    }
}

// K_i rows scaled in place by lambda^(n-1-j): the paper's lambda^B Lambda^-1 folded so that
// no exponent is negative.
template <typename T, int D>
__device__ __forceinline__ void decay_keys(T* sK, int n, float log2_decay) {
    using L = Smem<T, D>;
    for (int i = threadIdx.x; i < n * D; i += THREADS) {
        const int r = i / D, c = i % D;
        const float w = exp2f((float)(n - 1 - r) * log2_decay);
        sK[r * L::PK + c] = from_f32<T>(to_f32(sK[r * L::PK + c]) * w);
    }
}

// KV <- lambda^n KV + Kd^T V_i for this thread block's 64 state columns, Kd the decayed keys;
// with COPY also the T copy `sC` that feeds Q KV (the split-state kernel has none). Warp w owns state rows [w D/4, (w+1) D/4): reads and writes only those, so the caller
// synchronises once before (keys decayed) and once after (state read by every warp).
template <typename T, int D, bool COPY>
__device__ __forceinline__ void update_state(float* sS, T* sC, const T* sK, const T* sV,
                                             float whole) {
    using L = Smem<T, D>;
    constexpr int MT = D / 64;  // 16-row tiles per warp
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = warp * (D / 4);
    float acc[MT][ET / 8][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < ET / 8; ++j) {
            const int ra = row0 + m * 16 + g, c = 8 * j + 2 * t;
            const float2 lo = *reinterpret_cast<const float2*>(sS + ra * L::PS + c);
            const float2 hi = *reinterpret_cast<const float2*>(sS + (ra + 8) * L::PS + c);
            acc[m][j][0] = whole * lo.x;
            acc[m][j][1] = whole * lo.y;
            acc[m][j][2] = whole * hi.x;
            acc[m][j][3] = whole * hi.y;
        }
#pragma unroll 1
    for (int kk = 0; kk < BLOCK; kk += 16)
#pragma unroll
        for (int m = 0; m < MT; ++m)
            // A(r = state row, k = token) = Kd[token][row]; B(k = token, n) = V[token][n].
            warp_mma_16xn<true, true>(acc[m], sK + kk * L::PK + row0 + m * 16, L::PK, sV + kk * L::PV, L::PV);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < ET / 8; ++j) {
            const int ra = row0 + m * 16 + g, c = 8 * j + 2 * t;
            store2(sS + ra * L::PS + c, acc[m][j][0], acc[m][j][1]);
            store2(sS + (ra + 8) * L::PS + c, acc[m][j][2], acc[m][j][3]);
            if constexpr (COPY) {
                store2(sC + ra * L::PV + c, acc[m][j][0], acc[m][j][1]);
                store2(sC + (ra + 8) * L::PV + c, acc[m][j][2], acc[m][j][3]);
            }
        }
}

// One block's outputs, warp w's 16 rows: O = scale * (Lambda Q_i KV + [(Q_i K_i^T) (.) M] V_i),
// Lambda = diag(lambda^(r+1)), M[r][c] = lambda^(r-c) for c <= r. `sSop` is the state as an
// mma operand (the f32 state itself for f32, its T copy otherwise), pitch `sp`.
template <typename T, int D>
__device__ __forceinline__ void output_block(const LightningParams& p, const T* sQ, const T* sK,
                                             const T* sV, T* sP, const T* sSop, int sp,
                                             float log2_decay, T* out, int64_t out_stride,
                                             int n) {
    using L = Smem<T, D>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = warp * 16, ra = r0 + g, rb = ra + 8;
    float acc[ET / 8][4];
    zero_frags(acc);
    // Inter-block: Q_i KV.
#pragma unroll 1
    for (int kk = 0; kk < D; kk += 16) warp_mma_16xn<false, true>(acc, sQ + r0 * L::PK + kk, L::PK, sSop + kk * sp, sp);
    const float fa = p.causal ? p.scale * exp2f((float)(ra + 1) * log2_decay) : p.scale;
    const float fb = p.causal ? p.scale * exp2f((float)(rb + 1) * log2_decay) : p.scale;
#pragma unroll
    for (int j = 0; j < ET / 8; ++j) {
        acc[j][0] *= fa;
        acc[j][1] *= fa;
        acc[j][2] *= fb;
        acc[j][3] *= fb;
    }
    if (p.causal) {
        // Intra-block scores; key tiles past this warp's last row are masked for all its rows.
        const int jmax = 2 * warp + 2;
        float sc[BLOCK / 8][4];
        zero_frags(sc);
#pragma unroll 1
        for (int kk = 0; kk < D; kk += 16)
            warp_mma_16xn<false, false>(sc, sQ + r0 * L::PK + kk, L::PK, sK + kk, L::PK, jmax);
        // Decay mask and scale, rounded to T into this warp's rows of P.
#pragma unroll
        for (int j = 0; j < BLOCK / 8; ++j) {
            const int c = 8 * j + 2 * t;
            auto m = [&](float s, int r, int col) {
                return col <= r ? s * p.scale * exp2f((float)(r - col) * log2_decay) : 0.f;
            };
            store2(sP + ra * L::PV + c, m(sc[j][0], ra, c), m(sc[j][1], ra, c + 1));
            store2(sP + rb * L::PV + c, m(sc[j][2], rb, c), m(sc[j][3], rb, c + 1));
        }
        __syncwarp();
        // Intra-block: P V over the keys up to this warp's last row.
#pragma unroll 1
        for (int kk = 0; kk < 16 * (warp + 1); kk += 16)
            warp_mma_16xn<false, true>(acc, sP + r0 * L::PV + kk, L::PV, sV + kk * L::PV, L::PV);
    }
#pragma unroll
    for (int j = 0; j < ET / 8; ++j) {
        const int c = 8 * j + 2 * t;
        if (ra < n) store2(out + ra * out_stride + c, acc[j][0], acc[j][1]);
        if (rb < n) store2(out + rb * out_stride + c, acc[j][2], acc[j][3]);
    }
}

// The thread block's (sequence, head, e tile, split) and its token range.
struct Work {
    int64_t n, h, et, s, start, lo, hi;
    float log2_decay;
};

__device__ __forceinline__ Work work(const LightningParams& p) {
    const int e_tiles = p.e / ET;
    Work w;
    w.n = blockIdx.z;
    w.h = blockIdx.y / e_tiles;
    w.et = blockIdx.y % e_tiles;
    w.s = blockIdx.x;
    const SeqSpan sp = seq_span(p, w.n);
    w.start = sp.start;
    w.lo = w.s * p.split_len;
    w.hi = min(sp.len, w.lo + p.split_len);
    w.log2_decay = p.causal ? p.log2_decay[w.h] : 0.f;
    return w;
}

__device__ __forceinline__ float* slot(const LightningParams& p, const Work& w) {
    return static_cast<float*>(p.workspace) +
           ((w.n * p.heads + w.h) * p.n_splits + w.s) * (int64_t)p.d * p.e + w.et * ET;
}

template <typename T, int D>
__device__ void split_state(const LightningParams& p) {
    using L = Smem<T, D>;
    require_smem(L::SPLIT_BYTES);
    const Work w = work(p);
    if (w.lo >= w.hi) return;  // past the end of this sequence: the scan never reads the slot
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem + L::K_OFF);
    T* sV = reinterpret_cast<T*>(smem + L::V_OFF);
    float* sS = reinterpret_cast<float*>(smem + L::S_OFF);
    for (int i = threadIdx.x; i < D * L::PS; i += THREADS) sS[i] = 0.f;
    const T* k = static_cast<const T*>(p.k) + w.h * p.k_head;
    const T* v = static_cast<const T*>(p.v) + w.h * p.v_head + w.et * ET;
    for (int64_t t0 = w.lo; t0 < w.hi; t0 += BLOCK) {
        const int n = (int)min((int64_t)BLOCK, w.hi - t0);
        __syncthreads();  // the previous update is done with K and V
        load_tile<T, D, L::PK>(sK, k + (w.start + t0) * p.k_tok, p.k_tok, n);
        load_tile<T, ET, L::PV>(sV, v + (w.start + t0) * p.v_tok, p.v_tok, n);
        __syncthreads();
        decay_keys<T, D>(sK, n, w.log2_decay);
        __syncthreads();
        update_state<T, D, false>(sS, nullptr, sK, sV, exp2f((float)n * w.log2_decay));
    }
    __syncthreads();
    float* dst = slot(p, w);
    for (int i = threadIdx.x; i < D * ET; i += THREADS)
        dst[(i / ET) * (int64_t)p.e + i % ET] = sS[(i / ET) * L::PS + i % ET];
}

template <typename T, int D>
__device__ void output(const LightningParams& p) {
    using L = Smem<T, D>;
    require_smem(L::OUTPUT_BYTES);
    const Work w = work(p);
    if (w.lo >= w.hi) return;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem + L::K_OFF);
    T* sV = reinterpret_cast<T*>(smem + L::V_OFF);
    float* sS = reinterpret_cast<float*>(smem + L::S_OFF);
    T* sQ = reinterpret_cast<T*>(smem + L::Q_OFF);
    T* sP = reinterpret_cast<T*>(smem + L::P_OFF);
    T* sC = reinterpret_cast<T*>(smem + L::C_OFF);
    // The state entering this split, from the scan.
    const float* src = slot(p, w);
    for (int i = threadIdx.x; i < D * ET; i += THREADS) {
        const float x = src[(i / ET) * (int64_t)p.e + i % ET];
        sS[(i / ET) * L::PS + i % ET] = x;
        if constexpr (L::COPY) sC[(i / ET) * L::PV + i % ET] = from_f32<T>(x);
    }
    const T* sSop;
    int sp;
    if constexpr (L::COPY) {
        sSop = sC;
        sp = L::PV;
    } else {
        sSop = reinterpret_cast<const T*>(sS);
        sp = L::PS;
    }
    const T* q = static_cast<const T*>(p.q) + w.h * p.q_head;
    const T* k = static_cast<const T*>(p.k) + w.h * p.k_head;
    const T* v = static_cast<const T*>(p.v) + w.h * p.v_head + w.et * ET;
    T* o = static_cast<T*>(p.o) + w.h * p.o_head + w.et * ET;
    for (int64_t t0 = w.lo; t0 < w.hi; t0 += BLOCK) {
        const int n = (int)min((int64_t)BLOCK, w.hi - t0);
        const int64_t row = w.start + t0;
        __syncthreads();  // the previous block is done with every tile
        load_tile<T, D, L::PK>(sQ, q + row * p.q_tok, p.q_tok, n);
        if (p.causal) load_tile<T, D, L::PK>(sK, k + row * p.k_tok, p.k_tok, n);
        load_tile<T, ET, L::PV>(sV, v + row * p.v_tok, p.v_tok, n);
        __syncthreads();
        output_block<T, D>(p, sQ, sK, sV, sP, sSop, sp, w.log2_decay, o + row * p.o_tok, p.o_tok,
                           n);
        if (!p.causal || t0 + n >= w.hi) continue;  // the last block's state is the scan's
        __syncthreads();  // every warp is done reading K and the state
        decay_keys<T, D>(sK, n, w.log2_decay);
        __syncthreads();
        update_state<T, D, L::COPY>(sS, sC, sK, sV, exp2f((float)n * w.log2_decay));
    }
}

// One thread per state element of a (sequence, head): slot s becomes the state entering
// split s; the non-causal form leaves the total in every slot.
__device__ void scan(const LightningParams& p) {
    const int64_t de = (int64_t)p.d * p.e;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= de) return;
    const int64_t n = blockIdx.z, h = blockIdx.y, nh = n * p.heads + h;
    const SeqSpan sp = seq_span(p, n);
    const float l2 = p.causal ? p.log2_decay[h] : 0.f;
    float run = 0.f;
    if (p.causal && p.initial_state != nullptr)
        run = static_cast<const float*>(p.initial_state)[nh * de + i];
    float* ws = static_cast<float*>(p.workspace) + nh * p.n_splits * de + i;
    const int64_t used = (sp.len + p.split_len - 1) / p.split_len;
    for (int64_t s = 0; s < used; ++s) {
        const float local = ws[s * de];
        ws[s * de] = run;
        const int64_t len = min(p.split_len, sp.len - s * p.split_len);
        run = exp2f((float)len * l2) * run + local;
    }
    if (!p.causal)
        for (int64_t s = 0; s < used; ++s) ws[s * de] = run;
    if (p.final_state != nullptr) static_cast<float*>(p.final_state)[nh * de + i] = run;
}

// One token per (batch, head): S <- lambda S + k^T v, o = scale * q S; thread j owns state
// column j (coalesced over j), q and k staged in shared memory.
template <typename T>
__device__ void decode(const LightningParams& p) {
    __shared__ float sq[128], sk[128];
    const int64_t h = blockIdx.x, b = blockIdx.y;
    const int j = threadIdx.x;
    const T* q = static_cast<const T*>(p.q) + b * p.q_tok + h * p.q_head;
    const T* k = static_cast<const T*>(p.k) + b * p.k_tok + h * p.k_head;
    for (int x = j; x < p.d; x += blockDim.x) {
        sq[x] = to_f32(q[x]);
        sk[x] = to_f32(k[x]);
    }
    __syncthreads();
    if (j >= p.e) return;
    const float lambda = exp2f(p.log2_decay[h]);
    const float vj = to_f32(static_cast<const T*>(p.v)[b * p.v_tok + h * p.v_head + j]);
    float* S = static_cast<float*>(p.final_state) + ((b * p.heads + h) * p.d) * (int64_t)p.e + j;
    float acc = 0.f;
    for (int x = 0; x < p.d; ++x) {
        const float s = fmaf(lambda, S[x * p.e], sk[x] * vj);
        S[x * p.e] = s;
        acc = fmaf(sq[x], s, acc);
    }
    static_cast<T*>(p.o)[b * p.o_tok + h * p.o_head + j] = from_f32<T>(p.scale * acc);
}

}  // namespace lightning

// dtype x d dispatch; the host validated both before launch.
#define LIGHTNING_DISPATCH(FN, p)                                                           \
    switch ((p).dtype) {                                                                    \
        case ATTNKIT_DTYPE_F32:                                                             \
            if ((p).d == 64) FN<float, 64>(p); else FN<float, 128>(p);                      \
            break;                                                                          \
        case ATTNKIT_DTYPE_F16:                                                             \
            if ((p).d == 64) FN<__half, 64>(p); else FN<__half, 128>(p);                    \
            break;                                                                          \
        case ATTNKIT_DTYPE_BF16:                                                            \
            if ((p).d == 64) FN<__nv_bfloat16, 64>(p); else FN<__nv_bfloat16, 128>(p);      \
            break;                                                                          \
        default: break;                                                                     \
    }

extern "C" __global__ void __launch_bounds__(ATTNKIT_LIGHTNING_THREADS)
    lightning_split_state(const __grid_constant__ LightningParams p) {
    LIGHTNING_DISPATCH(lightning::split_state, p)
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_LIGHTNING_SCAN_THREADS)
    lightning_scan(const __grid_constant__ LightningParams p) {
    lightning::scan(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_LIGHTNING_THREADS)
    lightning_output(const __grid_constant__ LightningParams p) {
    LIGHTNING_DISPATCH(lightning::output, p)
}

extern "C" __global__ void __launch_bounds__(128)
    lightning_decode(const __grid_constant__ LightningParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F32: lightning::decode<float>(p); break;
        case ATTNKIT_DTYPE_F16: lightning::decode<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: lightning::decode<__nv_bfloat16>(p); break;
        default: break;
    }
}

ATTNKIT_DEFINE_PARAMS_ECHO(LightningParams)

// ---------------------------------------------------------------------------------------------
// Backward (the paper's forward sweep for dQ, reverse sweep for dK and dV), in the same chunked
// form. With S_t = lambda S_{t-1} + k_t^T v_t, o_t = c q_t S_t and G_t = c q_t^T dO_t +
// lambda G_{t+1} (G_{T-1} also gets dS_final):
//   dq_t = c dO_t S_t^T,   dk_t = G_t v_t^T,   dv_t = k_t G_t,   dS_init = lambda G_0.
// Each is one sweep over operands (a, b, c) of out_tau = a_tau X_tau, visiting positions tau in
// token order (DQ) or last token first (DKV, DK), where
//   X_tau = sum_{sigma <= tau} c lambda^(tau - sigma) b_sigma^T c_sigma + lambda^tau X_0.
// The state a block starts from is kept "one step ahead": E(tau0) = lambda X_(tau0 - 1), scale
// included, so that the entry X_0 (scale lambda S_init^T for dQ, dS_final for dK and dV) needs no
// division by lambda or by the scale, and every exponent stays >= 0:
//   out_r   = lambda^r a_r E + sum_{c <= r} scale lambda^(r-c) (a_r . b_c) c_c     (block rows r)
//   E'      = lambda^n E + sum_j (scale lambda^(n-j) b_j)^T c_j                     (n rows)
//   scan:   E(split s+1) = lambda^len E(split s) + local_s, E(split 0) = X_0; the last E is
//           dS_init for the DKV sweep (= lambda G_0).
// dK reuses the DKV sweep's split states transposed (its state is the transpose of dV's), so
// the backward is seven launches: DQ split/scan/output, DKV split/scan/output, DK output.
// ---------------------------------------------------------------------------------------------
namespace lightning {

// Where sweep position t of this thread block's sequence lives: token row first + t * step.
struct SweepRows {
    int64_t first, step;
};

__device__ __forceinline__ SweepRows sweep_rows(const LightningParams& p, const Work& w) {
    if (p.sweep == ATTNKIT_LIGHTNING_SWEEP_DQ) return {w.start, 1};
    const int64_t len = seq_span(p, w.n).len;
    return {w.start + len - 1, -1};
}

// b rows weighted in place by scale * lambda^(n-r) (r < n): the "one step ahead" state update.
template <typename T, int D>
__device__ __forceinline__ void weigh_update_rows(T* sB, int n, float scale, float log2_decay) {
    using L = Smem<T, D>;
    for (int i = threadIdx.x; i < n * D; i += THREADS) {
        T* x = sB + (i / D) * L::PK + i % D;
        *x = from_f32<T>(to_f32(*x) * scale * exp2f((float)(n - i / D) * log2_decay));
    }
}

// The warp's 16 accumulator rows (ET columns) += A (16 x kend) * B (kend x ET); A(r, k) at
// a[r * ap + k], B(k, j) at b[k * bp + j]. kend a multiple of 16.
template <typename T>
__device__ __forceinline__ void warp_rows_product(float (&acc)[ET / 8][4], const T* a, int ap,
                                                  const T* b, int bp, int kend) {
#pragma unroll 1
    for (int k0 = 0; k0 < kend; k0 += 16) warp_mma_16xn<false, true>(acc, a + k0, ap, b + k0 * bp, bp);
}

// The warp's 16 rows of the intra-block weights, P[r][c] = scale lambda^(r-c) (a_r . b_c) for
// c <= r and 0 above the diagonal, rounded to T into sP (pitch PV). Key tiles past the warp's
// last row are all masked, so they are not computed.
template <typename T, int D>
__device__ __forceinline__ void decayed_scores(const T* sA, const T* sB, T* sP, float scale,
                                               float log2_decay) {
    using L = Smem<T, D>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = 16 * warp, tiles = 2 * warp + 2;
    float s[BLOCK / 8][4] = {};
#pragma unroll 1
    for (int k0 = 0; k0 < D; k0 += 16)  // B(k, col) = b_col[k]: the keys' rows read as columns
        warp_mma_16xn<false, false>(s, sA + r0 * L::PK + k0, L::PK, sB + k0, L::PK, tiles);
#pragma unroll
    for (int j = 0; j < BLOCK / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = r0 + g + 8 * half, c = 8 * j + 2 * t;
            const float w0 = c <= r ? scale * exp2f((float)(r - c) * log2_decay) : 0.f;
            const float w1 = c + 1 <= r ? scale * exp2f((float)(r - c - 1) * log2_decay) : 0.f;
            store2(sP + r * L::PV + c, s[j][2 * half] * w0, s[j][2 * half + 1] * w1);
        }
}

// One block of a sweep, warp w's rows [16w, 16w + 16): out_r = lambda^r a_r E + intra, with E
// the block's entering state as an mma operand (`sE`, pitch `ep`; f32 itself or its T copy).
// Rows r >= n are zero inputs and are not stored; out row r at out + r * out_stride.
template <typename T, int D>
__device__ __forceinline__ void sweep_block(const LightningParams& p, const T* sA, const T* sB,
                                            const T* sC, T* sP, const T* sE, int ep,
                                            float log2_decay, T* out, int64_t out_stride, int n) {
    using L = Smem<T, D>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = 16 * warp;
    float acc[ET / 8][4] = {};
    warp_rows_product(acc, sA + r0 * L::PK, L::PK, sE, ep, D);
    // The non-causal form has log2_decay 0 here: a factor 1 and no intra part (E is the total).
    const float f[2] = {exp2f((float)(r0 + g) * log2_decay), exp2f((float)(r0 + g + 8) * log2_decay)};
#pragma unroll
    for (int j = 0; j < ET / 8; ++j)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[j][x] *= f[x >> 1];
    if (p.causal) {
        decayed_scores<T, D>(sA, sB, sP, p.scale, log2_decay);
        __syncwarp();  // the warp reads back only its own rows of P
        warp_rows_product(acc, sP + r0 * L::PV, L::PV, sC, L::PV, 16 * (warp + 1));
    }
#pragma unroll
    for (int j = 0; j < ET / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = r0 + g + 8 * half;
            if (r < n) store2(out + r * out_stride + 8 * j + 2 * t, acc[j][2 * half], acc[j][2 * half + 1]);
        }
}

// Per (split, head, e tile, sequence): the split's local state sum_j (scale lambda^(len-j)
// b_j)^T c_j in sweep order, into the workspace slot.
template <typename T, int D>
__device__ void bwd_split_state(const LightningParams& p) {
    using L = Smem<T, D>;
    require_smem(L::SPLIT_BYTES);
    const Work w = work(p);
    if (w.lo >= w.hi) return;  // past the end of this sequence: the scan never reads the slot
    const SweepRows rows = sweep_rows(p, w);
    extern __shared__ __align__(16) unsigned char smem[];
    T* sB = reinterpret_cast<T*>(smem + L::K_OFF);
    T* sC = reinterpret_cast<T*>(smem + L::V_OFF);
    float* sS = reinterpret_cast<float*>(smem + L::S_OFF);
    for (int i = threadIdx.x; i < D * L::PS; i += THREADS) sS[i] = 0.f;
    const T* b = static_cast<const T*>(p.k) + w.h * p.k_head;
    const T* c = static_cast<const T*>(p.v) + w.h * p.v_head + w.et * ET;
#pragma unroll 1
    for (int64_t t0 = w.lo; t0 < w.hi; t0 += BLOCK) {
        const int n = (int)min((int64_t)BLOCK, w.hi - t0);
        const int64_t row = rows.first + t0 * rows.step;
        __syncthreads();  // the previous update is done with b and c
        load_tile<T, D, L::PK>(sB, b + row * p.k_tok, rows.step * p.k_tok, n);
        load_tile<T, ET, L::PV>(sC, c + row * p.v_tok, rows.step * p.v_tok, n);
        __syncthreads();
        weigh_update_rows<T, D>(sB, n, p.scale, w.log2_decay);
        __syncthreads();
        update_state<T, D, false>(sS, nullptr, sB, sC, exp2f((float)n * w.log2_decay));
    }
    __syncthreads();
    float* dst = slot(p, w);
    for (int i = threadIdx.x; i < D * ET; i += THREADS)
        dst[(i / ET) * (int64_t)p.e + i % ET] = sS[(i / ET) * L::PS + i % ET];
}

// One thread per state element: slot s becomes E at the start of split s, from the entry X_0;
// the DKV sweep leaves the last E (d(initial state)) in final_state. Non-causal: the total
// scale * B^T C in every slot.
__device__ void bwd_scan(const LightningParams& p) {
    const int64_t de = (int64_t)p.d * p.e;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= de) return;
    const int64_t n = blockIdx.z, h = blockIdx.y, nh = n * p.heads + h;
    const float l2 = p.causal ? p.log2_decay[h] : 0.f;
    float entry = 0.f;
    if (p.causal && p.initial_state != nullptr) {
        const float* x0 = static_cast<const float*>(p.initial_state) + nh * de;
        // DQ: X_0 = scale lambda S_init^T, S_init being [e][d] in this sweep's dims.
        entry = p.sweep == ATTNKIT_LIGHTNING_SWEEP_DQ
                ? p.scale * exp2f(l2) * x0[(i % p.e) * p.d + i / p.e]
                : x0[i];
    }
    const int64_t len = seq_span(p, n).len;
    float* ws = static_cast<float*>(p.workspace) + nh * p.n_splits * de + i;
#pragma unroll 1
    for (int64_t s = 0, t0 = 0; t0 < len; ++s, t0 += p.split_len) {
        const float local = ws[s * de];
        ws[s * de] = entry;
        entry = exp2f((float)min(p.split_len, len - t0) * l2) * entry + local;
        if (!p.causal && t0 + p.split_len >= len)  // the total, back into every slot
            for (int64_t u = 0; u <= s; ++u) ws[u * de] = entry;
    }
    if (p.final_state != nullptr) static_cast<float*>(p.final_state)[nh * de + i] = entry;
}

// Per split: the entering state E from the scan (DK reads DKV's slot transposed: there the
// slot is [e][d] of this sweep's dims), then the block loop of sweep_block and the E update.
template <typename T, int D>
__device__ void bwd_output(const LightningParams& p) {
    using L = Smem<T, D>;
    require_smem(L::OUTPUT_BYTES);
    const Work w = work(p);
    if (w.lo >= w.hi) return;
    const SweepRows rows = sweep_rows(p, w);
    extern __shared__ __align__(16) unsigned char smem[];
    T* sB = reinterpret_cast<T*>(smem + L::K_OFF);
    T* sC = reinterpret_cast<T*>(smem + L::V_OFF);
    float* sS = reinterpret_cast<float*>(smem + L::S_OFF);
    T* sA = reinterpret_cast<T*>(smem + L::Q_OFF);
    T* sP = reinterpret_cast<T*>(smem + L::P_OFF);
    T* sCopy = reinterpret_cast<T*>(smem + L::C_OFF);
    const float* src = static_cast<const float*>(p.workspace) +
                       ((w.n * p.heads + w.h) * p.n_splits + w.s) * (int64_t)p.d * p.e;
    const bool transposed = p.sweep == ATTNKIT_LIGHTNING_SWEEP_DK;
    for (int i = threadIdx.x; i < D * ET; i += THREADS) {
        // Transposed: consecutive threads walk the rows, so the global reads stay coalesced.
        const int r = transposed ? i % D : i / ET, c = transposed ? i / D : i % ET;
        const float x = transposed ? src[(w.et * ET + c) * (int64_t)p.d + r]
                                   : src[r * (int64_t)p.e + w.et * ET + c];
        sS[r * L::PS + c] = x;
        if constexpr (L::COPY) sCopy[r * L::PV + c] = from_f32<T>(x);
    }
    const T* sE = L::COPY ? sCopy : reinterpret_cast<const T*>(sS);
    const int ep = L::COPY ? L::PV : L::PS;
    const T* a = static_cast<const T*>(p.q) + w.h * p.q_head;
    const T* b = static_cast<const T*>(p.k) + w.h * p.k_head;
    const T* c = static_cast<const T*>(p.v) + w.h * p.v_head + w.et * ET;
    T* out = static_cast<T*>(p.o) + w.h * p.o_head + w.et * ET;
#pragma unroll 1
    for (int64_t t0 = w.lo; t0 < w.hi; t0 += BLOCK) {
        const int n = (int)min((int64_t)BLOCK, w.hi - t0);
        const int64_t row = rows.first + t0 * rows.step;
        __syncthreads();  // the previous block is done with every tile and with E
        load_tile<T, D, L::PK>(sA, a + row * p.q_tok, rows.step * p.q_tok, n);
        if (p.causal) load_tile<T, D, L::PK>(sB, b + row * p.k_tok, rows.step * p.k_tok, n);
        load_tile<T, ET, L::PV>(sC, c + row * p.v_tok, rows.step * p.v_tok, n);
        __syncthreads();
        sweep_block<T, D>(p, sA, sB, sC, sP, sE, ep, w.log2_decay, out + row * p.o_tok,
                          rows.step * p.o_tok, n);
        if (!p.causal || t0 + n >= w.hi) continue;  // the next split's E is the scan's
        __syncthreads();  // every warp is done reading b and E
        weigh_update_rows<T, D>(sB, n, p.scale, w.log2_decay);
        __syncthreads();
        update_state<T, D, L::COPY>(sS, sCopy, sB, sC, exp2f((float)n * w.log2_decay));
    }
}

}  // namespace lightning

extern "C" __global__ void __launch_bounds__(ATTNKIT_LIGHTNING_THREADS)
    lightning_bwd_split_state(const __grid_constant__ LightningParams p) {
    LIGHTNING_DISPATCH(lightning::bwd_split_state, p)
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_LIGHTNING_SCAN_THREADS)
    lightning_bwd_scan(const __grid_constant__ LightningParams p) {
    lightning::bwd_scan(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_LIGHTNING_THREADS)
    lightning_bwd_output(const __grid_constant__ LightningParams p) {
    LIGHTNING_DISPATCH(lightning::bwd_output, p)
}
