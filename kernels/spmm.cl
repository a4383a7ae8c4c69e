// spmm.cl: Y = act(X·Wᵀ + bias) with W [N, K] sparse in CSR, BSR or SELL (ai.polaris SparseMatMul).
//
// Layouts are scipy's (data, indices, indptr); see polaris_opt/sparse/formats.py. One source
// serves every value and index type through -D defines:
//   VALUE_KIND    0 float32, 1 float16 (raw bits, converted here), 2 int8 with a per-row float
//                 scale applied once per output (w = data * scale[row])
//   INDEX_T       int or ushort (column / block-column indices)
//   VEC_WIDTH     4 or 8: floats in one vector (8 = one AVX2 register on PoCL)
//   TILE_VECTORS  vectors of activations one work-item of a *_tile kernel holds per weight:
//                 BATCH_TILE = VEC_WIDTH * TILE_VECTORS batch rows share each weight load
//   ROW_LANES     work-items sharing one CSR row in csr_spmv_vector (GPU profiles)
//   BLOCK_R, BLOCK_C   the BSR block shape (BSR programs only)
// Values are stored narrow and computed in float32 (Polaris has no packed FP16 and no int8 dot:
// narrow types are a bandwidth win only).
//
// PoCL does not inline its builtins (vload8, vload_half, min, fmax are calls that spill every
// vector register), so the hot loops use only operators: vectors are built from scalar loads,
// which LLVM merges, and float16 is decoded from its bits. Loops over private arrays carry
// `#pragma unroll` so the arrays live in registers.
//
// Batch 1 (SpMV) is memory- and gather-bound: each stored value and index is read once. On the
// CPU profile one work-item walks a CSR row VEC_WIDTH entries at a time into a vector of partial
// sums (SELL: VEC_WIDTH rows of a slice side by side); on GPU profiles ROW_LANES work-items
// share a CSR row so a wavefront's loads coalesce, and SELL takes a row per work-item (its
// column-major slices coalesce across the wavefront). BSR takes a block row per work-item and
// reads X contiguously, a block's columns at a time.
//
// Batch > 1: *_tile kernels read Xᵀ (XT[k * ldx + m], from the transpose kernel below or from
// im2col), zero-padded so ldx is a multiple of BATCH_TILE: the activations one stored weight
// multiplies are contiguous, loaded as whole vectors with no edge case. Work-item (row, tile)
// writes output (m, row), m < m_total, at
//     y[(m / pixels) * n_rows * pixels + row * pixels + m % pixels]
// which with pixels = 1 is row-major Y[M, N] and with pixels = OH·OW is NCHW (SparseConv).
//
// Every kernel bounds-checks: the host rounds the global size up to LOCAL_SIZE.

#ifndef LOCAL_SIZE
#error "build with -DLOCAL_SIZE=<n> (ClEnv adds it from the device profile)"
#endif
#ifndef VALUE_KIND
#error "build with -DVALUE_KIND=0|1|2 (float32, float16, int8 values)"
#endif
#ifndef INDEX_T
#error "build with -DINDEX_T=int|ushort"
#endif
#ifndef VEC_WIDTH
#define VEC_WIDTH 8
#endif
#ifndef TILE_VECTORS
#define TILE_VECTORS 1
#endif
#ifndef ROW_LANES
#define ROW_LANES 16
#endif
#ifndef BLOCK_R
#define BLOCK_R 1
#endif
#ifndef BLOCK_C
#define BLOCK_C 1
#endif

#define BATCH_TILE (VEC_WIDTH * TILE_VECTORS)
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define UNROLL _Pragma("unroll")
#define KERNEL __kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))

// flags, a kernel argument so one build serves all four combinations
#define FLAG_BIAS 1
#define FLAG_RELU 2

// ------------------------------------------------------------------------------- values

// IEEE binary16 bits to float, exactly, with operators only (after F. Giesen's half_to_float):
// shift exponent and mantissa into place and rebias the exponent by 127 - 15 = 112; infinities
// and NaNs rebias once more so their exponent is all ones; zeros and subnormals get exponent
// 113 and lose its implicit 1 by subtracting 2^-14 (exact), which leaves mantissa · 2^-24.
#define HALF_TO_FLOAT_BODY(uint_t, float_t, h)                                                    \
    const uint_t magnitude = (h) & 0x7fffu;                                                       \
    uint_t bits = (magnitude << 13) + (112u << 23);                                               \
    bits = magnitude >= 0x7c00u ? bits + (112u << 23) : bits;                                     \
    const float_t small = CAT(as_, float_t)(bits + (1u << 23)) - CAT(as_, float_t)((uint_t)(113u << 23)); \
    const float_t value = magnitude < 0x0400u ? small : CAT(as_, float_t)(bits);                  \
    return CAT(as_, float_t)(CAT(as_, uint_t)(value) | (((h) & 0x8000u) << 16))

inline float half_bits_to_float(uint h)
{
    HALF_TO_FLOAT_BODY(uint, float, h);
}

#if VALUE_KIND == 0
#define VALUE_T float
#define LOAD_VALUE(p, i) ((p)[i])
#elif VALUE_KIND == 1
#define VALUE_T ushort
#define LOAD_VALUE(p, i) half_bits_to_float((p)[i])
#elif VALUE_KIND == 2
#define VALUE_T char
#define LOAD_VALUE(p, i) ((float)(p)[i])
#else
#error "VALUE_KIND must be 0 (float32), 1 (float16) or 2 (int8)"
#endif

#if VEC_WIDTH == 8
#define VEC float8
#define UVEC uint8
#define LOAD_VEC(p) ((float8)((p)[0], (p)[1], (p)[2], (p)[3], (p)[4], (p)[5], (p)[6], (p)[7]))
#define LOAD_UVEC(p) ((uint8)((p)[0], (p)[1], (p)[2], (p)[3], (p)[4], (p)[5], (p)[6], (p)[7]))
// The x that indices j .. j+7 point at.
#define GATHER_VEC(x, ix, j)                                                                          \
    ((float8)((x)[(ix)[j]], (x)[(ix)[(j) + 1]], (x)[(ix)[(j) + 2]], (x)[(ix)[(j) + 3]], (x)[(ix)[(j) + 4]], \
              (x)[(ix)[(j) + 5]], (x)[(ix)[(j) + 6]], (x)[(ix)[(j) + 7]]))
#elif VEC_WIDTH == 4
#define VEC float4
#define UVEC uint4
#define LOAD_VEC(p) ((float4)((p)[0], (p)[1], (p)[2], (p)[3]))
#define LOAD_UVEC(p) ((uint4)((p)[0], (p)[1], (p)[2], (p)[3]))
#define GATHER_VEC(x, ix, j) ((float4)((x)[(ix)[j]], (x)[(ix)[(j) + 1]], (x)[(ix)[(j) + 2]], (x)[(ix)[(j) + 3]]))
#else
#error "VEC_WIDTH must be 4 or 8"
#endif

// The values of entries j .. j+VEC_WIDTH-1 as floats; float16 decoded as a whole vector.
#if VALUE_KIND == 1
inline VEC halves_to_floats(UVEC h)
{
    HALF_TO_FLOAT_BODY(UVEC, VEC, h);
}
#define VALUES_VEC(d, j) halves_to_floats(LOAD_UVEC((d) + (j)))
#else  // float32 as it is, int8 converted element by element by the vector literal
#define VALUES_VEC(d, j) LOAD_VEC((d) + (j))
#endif

typedef union {
    VEC v;
    float s[VEC_WIDTH];
} vec_lanes;

inline float sum_lanes(VEC v)
{
    vec_lanes lanes;
    lanes.v = v;
    float sum = 0.0f;
    UNROLL for (int i = 0; i < VEC_WIDTH; ++i) {
        sum += lanes.s[i];
    }
    return sum;
}

// The per-output epilogue: int8 scale, bias, activation. `v < 0 ? 0 : v` keeps a NaN a NaN,
// as np.maximum(v, 0) does.
inline float finish(float acc, uint row, __global const float *scale, __global const float *bias,
                    uint flags)
{
#if VALUE_KIND == 2
    acc *= scale[row];
#endif
    if (flags & FLAG_BIAS) {
        acc += bias[row];
    }
    if (flags & FLAG_RELU) {
        acc = acc < 0.0f ? 0.0f : acc;
    }
    return acc;
}

// Write one vector of outputs (m0 .. m0 + VEC_WIDTH - 1, row), those below m_total.
inline void store_vec(VEC acc, uint m0, uint m_total, uint row, uint n_rows, uint pixels, __global float *y,
                      __global const float *scale, __global const float *bias, uint flags)
{
    vec_lanes lanes;
    lanes.v = acc;
    UNROLL for (uint i = 0; i < VEC_WIDTH; ++i) {
        const uint m = m0 + i;
        if (m < m_total) {
            y[(m / pixels) * n_rows * pixels + row * pixels + m % pixels] =
                finish(lanes.s[i], row, scale, bias, flags);
        }
    }
}

// The BLOCK_R·BLOCK_C values of the block at data[base] as floats, decoded a vector at a time
// when the block is a whole number of vectors.
inline void load_block(__global const VALUE_T *data, size_t base, float *values)
{
#if (BLOCK_R * BLOCK_C) % VEC_WIDTH == 0
    UNROLL for (int i = 0; i < BLOCK_R * BLOCK_C; i += VEC_WIDTH) {
        vec_lanes lanes;
        lanes.v = VALUES_VEC(data, base + i);
        UNROLL for (int lane = 0; lane < VEC_WIDTH; ++lane) {
            values[i + lane] = lanes.s[lane];
        }
    }
#else
    UNROLL for (int i = 0; i < BLOCK_R * BLOCK_C; ++i) {
        values[i] = LOAD_VALUE(data, base + i);
    }
#endif
}

// ------------------------------------------------------------------------------------- CSR

// Batch 1, one work-item per row (CPU profile).
KERNEL void csr_spmv_row(const uint n_rows, __global const VALUE_T *data, __global const INDEX_T *indices,
                         __global const int *indptr, __global const float *x, __global float *y,
                         __global const float *scale, __global const float *bias, const uint flags)
{
    const uint row = get_global_id(0);
    if (row >= n_rows) {
        return;
    }
    const int end = indptr[row + 1];
    int j = indptr[row];
    VEC acc = (VEC)(0.0f);
    for (; j + VEC_WIDTH <= end; j += VEC_WIDTH) {
        acc += VALUES_VEC(data, j) * GATHER_VEC(x, indices, j);
    }
    float tail = 0.0f;
    for (; j < end; ++j) {
        tail += LOAD_VALUE(data, j) * x[indices[j]];
    }
    y[row] = finish(sum_lanes(acc) + tail, row, scale, bias, flags);
}

// Batch 1, ROW_LANES work-items per row summed through local memory (GPU profiles: a
// wavefront's loads of one row are consecutive addresses).
KERNEL void csr_spmv_vector(const uint n_rows, __global const VALUE_T *data,
                            __global const INDEX_T *indices, __global const int *indptr,
                            __global const float *x, __global float *y, __global const float *scale,
                            __global const float *bias, const uint flags)
{
    __local float partial[LOCAL_SIZE];
    const uint lid = get_local_id(0);
    const uint lane = lid % ROW_LANES;
    const uint row = get_group_id(0) * (LOCAL_SIZE / ROW_LANES) + lid / ROW_LANES;
    float acc = 0.0f;
    if (row < n_rows) {  // no early return: every work-item must reach the barriers
        const int end = indptr[row + 1];
        for (int j = indptr[row] + (int)lane; j < end; j += ROW_LANES) {
            acc += LOAD_VALUE(data, j) * x[indices[j]];
        }
    }
    partial[lid] = acc;
    for (uint half_lanes = ROW_LANES / 2; half_lanes > 0; half_lanes /= 2) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lane < half_lanes) {
            partial[lid] += partial[lid + half_lanes];
        }
    }
    if (lane == 0 && row < n_rows) {
        y[row] = finish(partial[lid], row, scale, bias, flags);
    }
}

// Batch > 1: work-item (row, batch tile) over XT [K, ldx]. Values are decoded VEC_WIDTH at a
// time (one vector conversion for fp16 and int8), then each multiplies TILE_VECTORS vectors of
// activations; alternate entries go to two sets of accumulators so consecutive multiply-adds
// do not wait on each other.
KERNEL void csr_spmm_tile(const uint n_rows, const uint m_total, __global const VALUE_T *data,
                          __global const INDEX_T *indices, __global const int *indptr,
                          __global const float *xt, const uint ldx, __global float *y, const uint pixels,
                          __global const float *scale, __global const float *bias, const uint flags)
{
    const uint row = get_global_id(0);
    const uint m0 = get_global_id(1) * BATCH_TILE;
    if (row >= n_rows || m0 >= m_total) {
        return;
    }
    __global const float *tile = xt + m0;
    VEC even[TILE_VECTORS], odd[TILE_VECTORS];
    UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
        even[u] = (VEC)(0.0f);
        odd[u] = (VEC)(0.0f);
    }
    const int end = indptr[row + 1];
    int j = indptr[row];
    for (; j + VEC_WIDTH <= end; j += VEC_WIDTH) {
        vec_lanes w;
        w.v = VALUES_VEC(data, j);
        UNROLL for (int i = 0; i < VEC_WIDTH; i += 2) {
            __global const float *x0 = tile + (size_t)indices[j + i] * ldx;
            __global const float *x1 = tile + (size_t)indices[j + i + 1] * ldx;
            UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
                even[u] += w.s[i] * LOAD_VEC(x0 + u * VEC_WIDTH);
                odd[u] += w.s[i + 1] * LOAD_VEC(x1 + u * VEC_WIDTH);
            }
        }
    }
    for (; j < end; ++j) {
        const float w0 = LOAD_VALUE(data, j);
        __global const float *x0 = tile + (size_t)indices[j] * ldx;
        UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
            even[u] += w0 * LOAD_VEC(x0 + u * VEC_WIDTH);
        }
    }
    UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
        store_vec(even[u] + odd[u], m0 + u * VEC_WIDTH, m_total, row, n_rows, pixels, y, scale, bias, flags);
    }
}

// ------------------------------------------------------------------------------------- BSR
// Blocks [BLOCK_R, BLOCK_C] row-major in data; W is zero-padded to whole blocks, so columns
// past k_total are read as 0 (never from X) and rows past n_rows are not written.

// The BLOCK_C activations a block starting at column col0 multiplies; columns past k_total
// (the zero padding of the last block column) read as 0, never from X.
inline void load_block_x(__global const float *x, uint col0, uint k_total, float *xs)
{
    if (col0 + BLOCK_C <= k_total) {
        UNROLL for (int c = 0; c < BLOCK_C; ++c) {
            xs[c] = x[col0 + c];
        }
    } else {
        UNROLL for (int c = 0; c < BLOCK_C; ++c) {
            xs[c] = col0 + c < k_total ? x[col0 + c] : 0.0f;
        }
    }
}

#define BLOCK_SIZE (BLOCK_R * BLOCK_C)
#if BLOCK_SIZE % VEC_WIDTH == 0
#define BLOCK_VECTORS (BLOCK_SIZE / VEC_WIDTH)
#else
#define BLOCK_VECTORS 0
#endif

// Batch 1, one work-item per block row. A partial sum per block entry, so a block's products
// are independent multiply-adds, not BLOCK_C dependent ones per row (whose latency would bound
// the kernel); when the block is whole vectors the partial sums are vectors, lane l of vector i
// holding entry i·VEC_WIDTH + l (row-major), times the activation of that entry's column.
KERNEL void bsr_spmv_row(const uint n_rows, const uint k_total, __global const VALUE_T *data,
                         __global const INDEX_T *indices, __global const int *indptr,
                         __global const float *x, __global float *y, __global const float *scale,
                         __global const float *bias, const uint flags)
{
    const uint block_row = get_global_id(0);
    if (block_row * BLOCK_R >= n_rows) {
        return;
    }
    float acc[BLOCK_SIZE];
    const int end = indptr[block_row + 1];
#if BLOCK_VECTORS
    VEC partial[BLOCK_VECTORS];
    UNROLL for (int i = 0; i < BLOCK_VECTORS; ++i) {
        partial[i] = (VEC)(0.0f);
    }
    for (int b = indptr[block_row]; b < end; ++b) {
        float xs[BLOCK_C];
        load_block_x(x, (uint)indices[b] * BLOCK_C, k_total, xs);
        UNROLL for (int i = 0; i < BLOCK_VECTORS; ++i) {
            vec_lanes columns;
            UNROLL for (int lane = 0; lane < VEC_WIDTH; ++lane) {
                columns.s[lane] = xs[(i * VEC_WIDTH + lane) % BLOCK_C];
            }
            partial[i] += VALUES_VEC(data, (size_t)b * BLOCK_SIZE + i * VEC_WIDTH) * columns.v;
        }
    }
    UNROLL for (int i = 0; i < BLOCK_VECTORS; ++i) {
        vec_lanes lanes;
        lanes.v = partial[i];
        UNROLL for (int lane = 0; lane < VEC_WIDTH; ++lane) {
            acc[i * VEC_WIDTH + lane] = lanes.s[lane];
        }
    }
#else
    UNROLL for (int i = 0; i < BLOCK_SIZE; ++i) {
        acc[i] = 0.0f;
    }
    for (int b = indptr[block_row]; b < end; ++b) {
        float values[BLOCK_SIZE], xs[BLOCK_C];
        load_block(data, (size_t)b * BLOCK_SIZE, values);
        load_block_x(x, (uint)indices[b] * BLOCK_C, k_total, xs);
        UNROLL for (int i = 0; i < BLOCK_SIZE; ++i) {
            acc[i] += values[i] * xs[i % BLOCK_C];
        }
    }
#endif
    UNROLL for (int r = 0; r < BLOCK_R; ++r) {
        const uint row = block_row * BLOCK_R + r;
        float sum = 0.0f;
        UNROLL for (int c = 0; c < BLOCK_C; ++c) {
            sum += acc[r * BLOCK_C + c];
        }
        if (row < n_rows) {
            y[row] = finish(sum, row, scale, bias, flags);
        }
    }
}

// Batch > 1: work-item (block row, batch tile) over XT [K, ldx]; BLOCK_R · TILE_VECTORS
// accumulators, each stored weight multiplies TILE_VECTORS vectors.
KERNEL void bsr_spmm_tile(const uint n_rows, const uint k_total, const uint m_total,
                          __global const VALUE_T *data, __global const INDEX_T *indices,
                          __global const int *indptr, __global const float *xt, const uint ldx,
                          __global float *y, const uint pixels, __global const float *scale,
                          __global const float *bias, const uint flags)
{
    const uint block_row = get_global_id(0);
    const uint m0 = get_global_id(1) * BATCH_TILE;
    if (block_row * BLOCK_R >= n_rows || m0 >= m_total) {
        return;
    }
    __global const float *tile = xt + m0;
    VEC acc[BLOCK_R][TILE_VECTORS];
    UNROLL for (int r = 0; r < BLOCK_R; ++r) {
        UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
            acc[r][u] = (VEC)(0.0f);
        }
    }
    const int end = indptr[block_row + 1];
    for (int b = indptr[block_row]; b < end; ++b) {
        const uint col0 = (uint)indices[b] * BLOCK_C;
        float values[BLOCK_R * BLOCK_C];
        load_block(data, (size_t)b * (BLOCK_R * BLOCK_C), values);
        UNROLL for (int c = 0; c < BLOCK_C; ++c) {
            if (col0 + c < k_total) {  // the zero-padded columns of the last block column
                __global const float *xs = tile + (size_t)(col0 + c) * ldx;
                UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
                    const VEC xv = LOAD_VEC(xs + u * VEC_WIDTH);
                    UNROLL for (int r = 0; r < BLOCK_R; ++r) {
                        acc[r][u] += values[r * BLOCK_C + c] * xv;
                    }
                }
            }
        }
    }
    UNROLL for (int r = 0; r < BLOCK_R; ++r) {
        const uint row = block_row * BLOCK_R + r;
        if (row < n_rows) {
            UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
                store_vec(acc[r][u], m0 + u * VEC_WIDTH, m_total, row, n_rows, pixels, y, scale, bias, flags);
            }
        }
    }
}

// ------------------------------------------------------------------------------------ SELL
// Slices of `slice_height` rows; element j of row r of slice s at indptr[s] + j * slice_height + r.
// Padding entries hold value 0 and column 0, so rows walk their slice's full width unbranched.

// Batch 1, one work-item per row (GPU profiles: consecutive rows read consecutive addresses).
KERNEL void sell_spmv_row(const uint n_rows, const uint slice_height, __global const VALUE_T *data,
                          __global const INDEX_T *indices, __global const int *indptr,
                          __global const float *x, __global float *y, __global const float *scale,
                          __global const float *bias, const uint flags)
{
    const uint row = get_global_id(0);
    if (row >= n_rows) {
        return;
    }
    const uint slice = row / slice_height;
    const int stride = (int)slice_height;
    const int end = indptr[slice + 1];
    int j = indptr[slice] + (int)(row % slice_height);
    float a0 = 0.0f, a1 = 0.0f;
    for (; j + stride < end; j += 2 * stride) {
        a0 += LOAD_VALUE(data, j) * x[indices[j]];
        a1 += LOAD_VALUE(data, j + stride) * x[indices[j + stride]];
    }
    if (j < end) {
        a0 += LOAD_VALUE(data, j) * x[indices[j]];
    }
    y[row] = finish(a0 + a1, row, scale, bias, flags);
}

// Batch 1, VEC_WIDTH consecutive rows of a slice per work-item (CPU profile, slice_height a
// multiple of VEC_WIDTH): their entries j sit side by side, one vector load of values.
KERNEL void sell_spmv_rows(const uint n_rows, const uint slice_height, __global const VALUE_T *data,
                           __global const INDEX_T *indices, __global const int *indptr,
                           __global const float *x, __global float *y, __global const float *scale,
                           __global const float *bias, const uint flags)
{
    const uint row0 = get_global_id(0) * VEC_WIDTH;
    if (row0 >= n_rows) {
        return;
    }
    const uint slice = row0 / slice_height;
    const int stride = (int)slice_height;
    const int end = indptr[slice + 1];
    VEC acc = (VEC)(0.0f);
    for (int j = indptr[slice] + (int)(row0 % slice_height); j < end; j += stride) {
        acc += VALUES_VEC(data, j) * GATHER_VEC(x, indices, j);
    }
    vec_lanes lanes;
    lanes.v = acc;
    UNROLL for (uint i = 0; i < VEC_WIDTH; ++i) {
        if (row0 + i < n_rows) {
            y[row0 + i] = finish(lanes.s[i], row0 + i, scale, bias, flags);
        }
    }
}

// Batch > 1: work-item (row, batch tile) over XT [K, ldx].
KERNEL void sell_spmm_tile(const uint n_rows, const uint slice_height, const uint m_total,
                           __global const VALUE_T *data, __global const INDEX_T *indices,
                           __global const int *indptr, __global const float *xt, const uint ldx,
                           __global float *y, const uint pixels, __global const float *scale,
                           __global const float *bias, const uint flags)
{
    const uint row = get_global_id(0);
    const uint m0 = get_global_id(1) * BATCH_TILE;
    if (row >= n_rows || m0 >= m_total) {
        return;
    }
    __global const float *tile = xt + m0;
    const uint slice = row / slice_height;
    const int stride = (int)slice_height;
    const int end = indptr[slice + 1];
    VEC acc[TILE_VECTORS];
    UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
        acc[u] = (VEC)(0.0f);
    }
    for (int j = indptr[slice] + (int)(row % slice_height); j < end; j += stride) {
        const float w = LOAD_VALUE(data, j);
        __global const float *xs = tile + (size_t)indices[j] * ldx;
        UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
            acc[u] += w * LOAD_VEC(xs + u * VEC_WIDTH);
        }
    }
    UNROLL for (int u = 0; u < TILE_VECTORS; ++u) {
        store_vec(acc[u], m0 + u * VEC_WIDTH, m_total, row, n_rows, pixels, y, scale, bias, flags);
    }
}

// ------------------------------------------------------------------------------- transpose

// XT [K, ldx] from X [M, K] (row-major both), columns M .. ldx-1 zero (so the lanes past the
// batch compute on zeros, not on leftover memory whose denormals would slow a CPU down).
// Work-item (m, kb) moves X[m, kb·VEC_WIDTH ..] (one contiguous read) into VEC_WIDTH rows of XT;
// consecutive work-items write consecutive addresses of each row.
KERNEL void transpose(const uint m_total, const uint k_total, const uint ldx, __global const float *x,
                      __global float *xt)
{
    const uint m = get_global_id(0);
    const uint k0 = get_global_id(1) * VEC_WIDTH;
    if (m >= ldx || k0 >= k_total) {
        return;
    }
    __global const float *source = x + (size_t)m * k_total + k0;
    const bool inside = m < m_total;
    if (k0 + VEC_WIDTH <= k_total) {
        vec_lanes lanes;
        lanes.v = inside ? LOAD_VEC(source) : (VEC)(0.0f);
        UNROLL for (uint i = 0; i < VEC_WIDTH; ++i) {
            xt[(size_t)(k0 + i) * ldx + m] = lanes.s[i];
        }
    } else {
        for (uint k = k0; k < k_total; ++k) {
            xt[(size_t)k * ldx + m] = inside ? x[(size_t)m * k_total + k] : 0.0f;
        }
    }
}
