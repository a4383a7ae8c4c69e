// int4.cl: ai.polaris MatMulInt4 (docs/OPS.md), Y = X·Wᵀ + bias with block-wise INT4 weights.
//
// W [N, K] is stored in com.microsoft.MatMulNBits' layout: each row n is cut along K into
// blocks of BLOCK_SIZE (a power of two >= 16, passed as an argument), two 4-bit codes per byte
// with element 2i in the low nibble, one float scale per block and an optional 4-bit zero point
// per block (packed the same way, two blocks per byte; absent: 8). Codes are unpacked on the
// fly and W = (code - zero point) * scale is formed in float32 exactly as the reference does;
// only the float accumulation order differs from it.
//
// Layouts: ROW_PER_WORK_ITEM (cpu profile, PoCL) runs one work-item per output feature n and
// TILE_M batch rows; GPUs run matmul_int4_wave, a work-group per (n, TILE_M rows) whose lanes
// take 4 packed bytes (8 codes) each, coalesced, and reduce in local memory. TILE_M > 1 reuses
// each unpacked weight for TILE_M activation rows.
//
// PoCL does not inline builtins such as min, vload4, vload8 and dot (kernels/spmm.cl's header):
// each is a call that spills every vector register. The hot loops use operators only: bytes and
// floats loaded one by one (LLVM merges neighbouring loads) and the dot products written out.
// matmul_int4_wave (GPU layout, run on PoCL, 512 x 1024) measured 1.3x faster at batch 1 and
// 1.4-2x at batch 8 than with vload4/vload8/dot/min; matmul_int4_rows keeps its one min (see there).
//
// OpenCL C 1.2. Any power-of-two LOCAL_SIZE works, and any TILE_M.

#ifndef WAVEFRONT
#error "build with -DWAVEFRONT=<n> from the device profile"
#endif
#ifndef LOCAL_SIZE
#define LOCAL_SIZE WAVEFRONT
#endif
#ifndef TILE_M
#define TILE_M 1
#endif

#ifdef __clang__
// Lets the compiler reorder the float sums of the dot products so it can vectorize them (PoCL:
// 4.4 ms instead of 22 ms for a 4096x4096 GEMV). Only the order of the additions changes.
#pragma clang fp reassociate(on)
#endif

#define SYMMETRIC_ZERO_POINT 8.0f

// The 4-bit zero point of block b of row n (zero_points: [N, ceil(blocks / 2)] packed bytes).
static float zero_point(__global const uchar *zero_points, const int has_zero_points, const uint n,
                        const uint blocks, const uint b)
{
    if (!has_zero_points) {
        return SYMMETRIC_ZERO_POINT;
    }
    const uchar pair = zero_points[(size_t)n * ((blocks + 1) / 2) + b / 2];
    return (float)((b & 1) ? (pair >> 4) : (pair & 15));
}

// Code i (0-based along K inside the row) from a row's packed bytes.
static float code_at(__global const uchar *packed_row, const uint i)
{
    const uchar pair = packed_row[i / 2];
    return (float)((i & 1) ? (pair >> 4) : (pair & 15));
}

#if ROW_PER_WORK_ITEM

// One work-item: output feature n for batch rows m0 .. m0+TILE_M-1 (rows past M are clamped to
// M-1, computed again and not stored). Whole blocks run a branch-free loop over byte pairs;
// only the last, partial block (K not a multiple of the block size) checks k < K.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void matmul_int4_rows(__global const float *x, __global const uchar *packed,
                      __global const float *scales, __global const uchar *zero_points,
                      const int has_zero_points, __global const float *bias, const int has_bias,
                      const uint M, const uint N, const uint K, const uint block_size,
                      __global float *y)
{
    const uint n = get_global_id(0);
    const uint m0 = get_global_id(1) * TILE_M;
    if (n >= N || m0 >= M) {
        return;
    }
    const uint blocks = (K + block_size - 1) / block_size;
    __global const uchar *row = packed + (size_t)n * blocks * (block_size / 2);
    __global const float *rows[TILE_M];
    float acc[TILE_M];
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        // min stays: a call, but once per work-item, outside the loops; as a ternary (tile_row below)
        // this kernel measured 5-9 % slower at batch 1 on PoCL (4096 x 4096, interleaved runs).
        rows[t] = x + (size_t)min(m0 + t, M - 1) * K;
        acc[t] = 0.0f;
    }
    for (uint b = 0; b < blocks; ++b) {
        const float scale = scales[(size_t)n * blocks + b];
        const float zp = zero_point(zero_points, has_zero_points, n, blocks, b);
        const uint k0 = b * block_size;
        __global const uchar *block = row + k0 / 2;
        if (k0 + block_size <= K) {
            for (uint j = 0; j < block_size / 2; ++j) {
                const uchar pair = block[j];
                const float w0 = ((float)(pair & 15) - zp) * scale;
                const float w1 = ((float)(pair >> 4) - zp) * scale;
#pragma unroll
                for (uint t = 0; t < TILE_M; ++t) {
                    acc[t] += rows[t][k0 + 2 * j] * w0 + rows[t][k0 + 2 * j + 1] * w1;
                }
            }
        } else {
            for (uint i = 0; k0 + i < K; ++i) {
                const float w = (code_at(block, i) - zp) * scale;
#pragma unroll
                for (uint t = 0; t < TILE_M; ++t) {
                    acc[t] += rows[t][k0 + i] * w;
                }
            }
        }
    }
    const float shift = has_bias ? bias[n] : 0.0f;
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        if (m0 + t < M) {
            y[(size_t)(m0 + t) * N + n] = acc[t] + shift;
        }
    }
}

#else  // GPU layout

// Batch row m0 + t, clamped to the last row M - 1: a tile's rows past M are computed again and not
// stored, which keeps the inner loops free of branches.
static uint tile_row(const uint m0, const uint t, const uint M)
{
    return m0 + t < M ? m0 + t : M - 1;
}

// One work-group: output feature n (group 0) for TILE_M batch rows (group 1). A lane takes 4
// packed bytes = 8 codes at a time; a block holds at least 8 bytes, so the 8 codes share one
// scale and zero point.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void matmul_int4_wave(__global const float *x, __global const uchar *packed,
                      __global const float *scales, __global const uchar *zero_points,
                      const int has_zero_points, __global const float *bias, const int has_bias,
                      const uint M, const uint N, const uint K, const uint block_size,
                      __global float *y)
{
    __local float partial[TILE_M][LOCAL_SIZE];
    const uint n = get_group_id(0);
    const uint m0 = get_group_id(1) * TILE_M;
    const uint lane = get_local_id(0);
    const uint blocks = (K + block_size - 1) / block_size;
    __global const uchar *row = packed + (size_t)n * blocks * (block_size / 2);
    __global const float *rows[TILE_M];
    float acc[TILE_M];
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        rows[t] = x + (size_t)tile_row(m0, t, M) * K;
        acc[t] = 0.0f;
    }
    for (uint k = lane * 8; k < K; k += LOCAL_SIZE * 8) {
        const uint b = k / block_size;
        const float scale = scales[(size_t)n * blocks + b];
        const float zp = zero_point(zero_points, has_zero_points, n, blocks, b);
        if (k + 8 <= K) {
            // codes k, k+2, k+4, k+6 are the low nibbles, k+1, k+3, ... the high ones
            __global const uchar *pairs = row + k / 2;
            float w[8];
#pragma unroll
            for (uint j = 0; j < 4; ++j) {
                w[2 * j] = ((float)(pairs[j] & 15) - zp) * scale;
                w[2 * j + 1] = ((float)(pairs[j] >> 4) - zp) * scale;
            }
#pragma unroll
            for (uint t = 0; t < TILE_M; ++t) {
                __global const float *xk = rows[t] + k;
                acc[t] += xk[0] * w[0] + xk[1] * w[1] + xk[2] * w[2] + xk[3] * w[3] + xk[4] * w[4] +
                          xk[5] * w[5] + xk[6] * w[6] + xk[7] * w[7];
            }
        } else {  // the last block ends inside these 8 codes
            for (uint i = k; i < K; ++i) {
                const float w = (code_at(row, i) - zp) * scale;
#pragma unroll
                for (uint t = 0; t < TILE_M; ++t) {
                    acc[t] += rows[t][i] * w;
                }
            }
        }
    }
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        partial[t][lane] = acc[t];
    }
    for (uint stride = LOCAL_SIZE / 2; stride > 0; stride /= 2) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lane < stride) {
#pragma unroll
            for (uint t = 0; t < TILE_M; ++t) {
                partial[t][lane] += partial[t][lane + stride];
            }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint t = lane; t < TILE_M && m0 + t < M; t += LOCAL_SIZE) {  // any TILE_M, even > LOCAL_SIZE
        y[(size_t)(m0 + t) * N + n] = partial[t][0] + (has_bias ? bias[n] : 0.0f);
    }
}

#endif
