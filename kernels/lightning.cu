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
    static constexpr int PS = ET;        // pitch of the f32 state [D][ET]
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
            acc[m][j][0] = whole * sS[ra * L::PS + c];
            acc[m][j][1] = whole * sS[ra * L::PS + c + 1];
            acc[m][j][2] = whole * sS[(ra + 8) * L::PS + c];
            acc[m][j][3] = whole * sS[(ra + 8) * L::PS + c + 1];
        }
#pragma unroll 1
    for (int kk = 0; kk < BLOCK; kk += 16)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int j = 0; j < ET / 8; ++j)
                // A(r = state row, k = token) = Kd[token][row]; B(k = token, n) = V[token][n].
                warp_mma_16x8x16(acc[m][j], sK + kk * L::PK + row0 + m * 16, 1, L::PK,
                                 sV + kk * L::PV + 8 * j, L::PV, 1);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < ET / 8; ++j) {
            const int ra = row0 + m * 16 + g, c = 8 * j + 2 * t;
            sS[ra * L::PS + c] = acc[m][j][0];
            sS[ra * L::PS + c + 1] = acc[m][j][1];
            sS[(ra + 8) * L::PS + c] = acc[m][j][2];
            sS[(ra + 8) * L::PS + c + 1] = acc[m][j][3];
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
#pragma unroll
    for (int j = 0; j < ET / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    // Inter-block: Q_i KV.
#pragma unroll 1
    for (int kk = 0; kk < D; kk += 16)
#pragma unroll
        for (int j = 0; j < ET / 8; ++j)
            warp_mma_16x8x16(acc[j], sQ + r0 * L::PK + kk, L::PK, 1, sSop + kk * sp + 8 * j, sp, 1);
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
#pragma unroll
        for (int j = 0; j < BLOCK / 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll 1
        for (int kk = 0; kk < D; kk += 16)
#pragma unroll
            for (int j = 0; j < BLOCK / 8; ++j)
                if (j < jmax)
                    warp_mma_16x8x16(sc[j], sQ + r0 * L::PK + kk, L::PK, 1, sK + 8 * j * L::PK + kk,
                                     1, L::PK);
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
#pragma unroll
                for (int j = 0; j < ET / 8; ++j)
                    warp_mma_16x8x16(acc[j], sP + r0 * L::PV + kk, L::PV, 1, sV + kk * L::PV + 8 * j,
                                     L::PV, 1);
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
