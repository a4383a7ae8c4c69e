// qmatmul.cl: ai.polaris QMatMul / QGemm (docs/OPS.md), INT8 weights and UINT8 activations.
//
//   x_q   = clip(round(X / x_scale) + zp, 0, 255)    (quantize_*; ties to even)
//   acc   = sum_k (x_q[m,k] - zp) * w_q[n,k]   as int32
//         = sum_k x_q[m,k] * w_q[n,k]  -  zp * w_sum[n]          (w_sum: row sums of w_q, host-made)
//   Y     = act(alpha * x_scale * w_scale[n] * acc + bias[n])
//
// Polaris has no int8 dot instruction, so the products are widened and accumulated in int;
// storing the weight in 8 bits is a bandwidth win (batch 1 is memory-bound), not a compute one.
// The zero point comes out of the inner loop through w_sum, so activations stay 8-bit too.
//
// x_scale and zp live in a 2-float device buffer `params` ([scale, zero point]): uploaded once
// for static quantization, or derived from X's range on the device (quantize_dynamic_small, or
// range_partial + dynamic_params for a large X), so nothing goes back to the host.
//
// Layouts: ROW_PER_WORK_ITEM (cpu profile, PoCL) runs one work-item per output feature n and
// TILE_M batch rows, a plain loop the compiler vectorizes; GPUs run qgemm_wave, a
// work-group per (n, TILE_M rows) whose lanes stride along K with coalesced 4-byte loads and
// reduce in local memory. TILE_M > 1 reuses each weight row for TILE_M activation rows.
//
// PoCL does not inline builtins such as fmin, fmax, clamp, vload4 and vstore2 (kernels/spmm.cl's
// header): each is a call, which spills every vector register and keeps PoCL from vectorizing
// the loop around it. The loops here use operators only: the comparisons below, bytes loaded one
// by one (LLVM merges neighbouring loads), and round_half_even's exact addition for rint. The one
// builtin left, min in qgemm_rows, runs once per work-item (see there). Measured on PoCL (2 EPYC
// cores) against the same kernels with the builtins, interleaved in one process, outputs equal
// bit for bit: quantizing a [32, 4096] X 1.4-1.5x faster with its range (dynamic), 1.2x without;
// qgemm_wave (GPU layout, run on PoCL) 1.5x at batch 1 and 3-4x at batch 8 (512 x 1024).
//
// OpenCL C 1.2. No int32 overflow: each partial sum is at most 255 * 128 * K, below 2^31 for
// K <= MAX_QUANT_K (65793), which the launcher enforces. Any power-of-two LOCAL_SIZE works, and
// any TILE_M.

#ifndef WAVEFRONT
#error "build with -DWAVEFRONT=<n> from the device profile"
#endif
#ifndef LOCAL_SIZE
#define LOCAL_SIZE WAVEFRONT
#endif
#ifndef TILE_M
#define TILE_M 1
#endif

#define QMAX 255.0f

// The reference (polaris_opt.ops.reference) rounds acc * multiplier and then adds the bias; a
// fused multiply-add would round once, and the results would differ in the last bit.
#pragma OPENCL FP_CONTRACT OFF

// ------------------------------------------------------------------ activation quantization

// fmin(a, b) and fmax(a, b) for a range fold: a NaN b leaves a as it is, as fmin and fmax do.
static float lower_of(const float a, const float b)
{
    return b < a ? b : a;
}

static float upper_of(const float a, const float b)
{
    return b > a ? b : a;
}

// clamp(v, 0, 255) = fmin(fmax(v, 0), 255): a NaN v becomes 0, as fmax(NaN, 0) makes it.
static float clamp_code(const float v)
{
    return v > 0.0f ? (v < QMAX ? v : QMAX) : 0.0f;
}

// Tree reduction of LOCAL_SIZE (lo, hi) pairs in local memory; the result lands in slot 0.
static void reduce_range(__local float *lo, __local float *hi)
{
    const uint lane = get_local_id(0);
    for (uint stride = LOCAL_SIZE / 2; stride > 0; stride /= 2) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lane < stride) {
            lo[lane] = lower_of(lo[lane], lo[lane + stride]);
            hi[lane] = upper_of(hi[lane], hi[lane + stride]);
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
}

// rint(v), ties to even, for |v| < 2^22: adding 1.5 * 2^23 moves v into [2^23, 2^24), where the
// floats are exactly the integers, so the addition rounds v to an integer the way rint does and
// subtracting the constant back is exact. A larger |v| comes back within 1 of v, which clamps
// to 0 or 255 exactly as rint(v) would. (PoCL's rint is a library call: 5x slower.)
static float round_half_even(const float v)
{
    return (v + 12582912.0f) - 12582912.0f;
}

// x_q = clip(round(x / scale) + zp, 0, 255), as QuantizeLinear computes it.
static uchar quantize(const float x, const float scale, const float zero_point)
{
    return (uchar)clamp_code(round_half_even(x / scale) + zero_point);
}

// (scale, zero point) of a range holding 0, as DynamicQuantizeLinear derives them. An all-zero X
// gets scale 1 (ONNX Runtime's choice): x_q is then all zero points and acc is 0 anyway.
static float2 dynamic_params_of(const float low, const float high)
{
    const float quotient = (high - low) / QMAX;
    const float scale = quotient == 0.0f ? 1.0f : quotient;
    return (float2)(scale, round_half_even(clamp_code(0.0f - low / scale)));
}

// Static quantization with [scale, zero point] from `params`, one value per work-item; also the
// last step of the dynamic path for a large X, once dynamic_params has written `params`.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void quantize_static(__global const float *x, const uint count, __global const float *params,
                     __global uchar *x_q)
{
    const uint i = get_global_id(0);
    if (i < count) {
        x_q[i] = quantize(x[i], params[0], params[1]);
    }
}

// A small X (batch 1) in one launch of one work-group: its range, its parameters, its codes.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void quantize_dynamic_small(__global const float *x, const uint count, __global float *params,
                            __global uchar *x_q)
{
    __local float lo[LOCAL_SIZE];
    __local float hi[LOCAL_SIZE];
    const uint lane = get_local_id(0);
    float low = 0.0f, high = 0.0f;  // the range always holds 0
    for (uint i = lane; i < count; i += LOCAL_SIZE) {
        low = lower_of(low, x[i]);
        high = upper_of(high, x[i]);
    }
    lo[lane] = low;
    hi[lane] = high;
    reduce_range(lo, hi);
    const float2 scale_zp = dynamic_params_of(lo[0], hi[0]);  // every lane: no second barrier
    if (lane == 0) {
        params[0] = scale_zp.x;
        params[1] = scale_zp.y;
    }
    for (uint i = lane; i < count; i += LOCAL_SIZE) {
        x_q[i] = quantize(x[i], scale_zp.x, scale_zp.y);
    }
}

// A large X, pass 1: each work-group folds a grid-strided share of x into one (min, max) pair.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void range_partial(__global const float *x, const uint count, __global float2 *partial)
{
    __local float lo[LOCAL_SIZE];
    __local float hi[LOCAL_SIZE];
    float low = 0.0f, high = 0.0f;  // the range always holds 0
    for (uint i = get_global_id(0); i < count; i += get_global_size(0)) {
        low = lower_of(low, x[i]);
        high = upper_of(high, x[i]);
    }
    lo[get_local_id(0)] = low;
    hi[get_local_id(0)] = high;
    reduce_range(lo, hi);
    if (get_local_id(0) == 0) {
        partial[get_group_id(0)] = (float2)(lo[0], hi[0]);
    }
}

// A large X, pass 2, one work-group: fold the partial ranges into `params`.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void dynamic_params(__global const float2 *partial, const uint groups, __global float *params)
{
    __local float lo[LOCAL_SIZE];
    __local float hi[LOCAL_SIZE];
    float low = 0.0f, high = 0.0f;
    for (uint g = get_local_id(0); g < groups; g += LOCAL_SIZE) {
        low = lower_of(low, partial[g].x);
        high = upper_of(high, partial[g].y);
    }
    lo[get_local_id(0)] = low;
    hi[get_local_id(0)] = high;
    reduce_range(lo, hi);
    if (get_local_id(0) == 0) {
        const float2 scale_zp = dynamic_params_of(lo[0], hi[0]);
        params[0] = scale_zp.x;
        params[1] = scale_zp.y;
    }
}

// ------------------------------------------------------------------------------ epilogue

// Y[m, n] from the exact integer sum: after quantizing X, the op's only roundings happen here.
static float finish(const int dot, const int n, __global const int *w_sum,
                    __global const float *w_scale, __global const float *bias,
                    __global const float *params, const float alpha, const int has_bias,
                    const int relu)
{
    const int acc = dot - (int)params[1] * w_sum[n];
    float value = (float)acc * (alpha * params[0] * w_scale[n]);
    if (has_bias) {
        value += bias[n];
    }
    return relu ? (value > 0.0f ? value : 0.0f) : value;  // fmax(value, 0): a NaN becomes 0
}

// --------------------------------------------------------------------------- CPU layout

#if ROW_PER_WORK_ITEM

// One work-item: output feature n for batch rows m0 .. m0+TILE_M-1 (rows past M are clamped to
// M-1, computed again and not stored, which keeps the inner loop free of branches).
//
// The K loop is written scalar on purpose: PoCL's LLVM vectorizes this 8-bit dot-product
// reduction itself (measured 18 GMAC/s at batch 1 on 2 EPYC cores), while explicit short16/int16
// vector code was compiled into shuffles and ran at 4.7. The TILE_M loops must be unrolled for
// that vectorization to happen, hence the pragmas.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void qgemm_rows(__global const uchar *x_q, __global const char *w_q, __global const int *w_sum,
                __global const float *w_scale, __global const float *bias,
                __global const float *params, const float alpha, const int has_bias,
                const int relu, const uint M, const uint N, const uint K, __global float *y)
{
    const uint n = get_global_id(0);
    const uint m0 = get_global_id(1) * TILE_M;
    if (n >= N || m0 >= M) {
        return;
    }
    __global const char *w = w_q + (size_t)n * K;
    __global const uchar *rows[TILE_M];
    int dots[TILE_M];
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        // min stays: a call, but once per work-item, outside the loops; as a ternary (tile_row below)
        // this kernel measured 5-9 % slower at batch 1 on PoCL (4096 x 4096, interleaved runs).
        rows[t] = x_q + (size_t)min(m0 + t, M - 1) * K;
        dots[t] = 0;
    }
    for (uint k = 0; k < K; ++k) {
        const int wk = w[k];
#pragma unroll
        for (uint t = 0; t < TILE_M; ++t) {
            dots[t] += (int)rows[t][k] * wk;
        }
    }
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        if (m0 + t < M) {
            y[(size_t)(m0 + t) * N + n] =
                finish(dots[t], n, w_sum, w_scale, bias, params, alpha, has_bias, relu);
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

// One work-group: output feature n (group 0) for TILE_M batch rows (group 1). Lanes read 4
// consecutive bytes each, so a wavefront reads one contiguous stretch of the weight row; the
// bytes are loaded one by one (a vload4 is a call on PoCL) and the int products are exact in
// any order.
__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void qgemm_wave(__global const uchar *x_q, __global const char *w_q, __global const int *w_sum,
                __global const float *w_scale, __global const float *bias,
                __global const float *params, const float alpha, const int has_bias,
                const int relu, const uint M, const uint N, const uint K, __global float *y)
{
    __local int partial[TILE_M][LOCAL_SIZE];
    const uint n = get_group_id(0);
    const uint m0 = get_group_id(1) * TILE_M;
    const uint lane = get_local_id(0);
    __global const char *w = w_q + (size_t)n * K;
    __global const uchar *rows[TILE_M];
    int acc[TILE_M];
#pragma unroll
    for (uint t = 0; t < TILE_M; ++t) {
        rows[t] = x_q + (size_t)tile_row(m0, t, M) * K;
        acc[t] = 0;
    }
    const uint body = K & ~3u;
    for (uint k = lane * 4; k < body; k += LOCAL_SIZE * 4) {
        const int w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3];
#pragma unroll
        for (uint t = 0; t < TILE_M; ++t) {
            __global const uchar *x = rows[t] + k;
            acc[t] += (int)x[0] * w0 + (int)x[1] * w1 + (int)x[2] * w2 + (int)x[3] * w3;
        }
    }
    for (uint k = body + lane; k < K; k += LOCAL_SIZE) {  // at most 3 ragged columns
#pragma unroll
        for (uint t = 0; t < TILE_M; ++t) {
            acc[t] += (int)rows[t][k] * (int)w[k];
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
        y[(size_t)(m0 + t) * N + n] =
            finish(partial[t][0], n, w_sum, w_scale, bias, params, alpha, has_bias, relu);
    }
}

#endif
