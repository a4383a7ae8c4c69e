// im2col.cl: the columns of a convolution, laid out for spmm.cl's *_tile kernels (ai.polaris SparseConv).
//
// From X [B, C, H, W] it writes XT [C·kh·kw, ldx]: row k = (c, i, j) in Conv weight order (the
// columns of W [O, C·kh·kw]), column m = (b, oh, ow) for m < B·OH·OW and 0 up to ldx (the tile
// kernels read whole tiles; zeros, not leftover memory whose denormals would slow a CPU down).
// That is im2col's [B·OH·OW, C·kh·kw] transposed, which is what the tile kernels read: the
// batch tile of one weight is contiguous. Conv padding reads as 0.
// A 1×1 stride-1 unpadded conv of a batch of one needs none of this when its pixel count is a
// whole number of tiles (X itself is XT); otherwise this kernel only reorders and pads.
//
// Work-item (m, k): the work-items of a group write consecutive addresses of one XT row.

#ifndef LOCAL_SIZE
#error "build with -DLOCAL_SIZE=<n> (ClEnv adds it from the device profile)"
#endif

__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void im2col(const uint batch, const uint channels, const uint height, const uint width,
            const uint out_h, const uint out_w, const uint kernel_h, const uint kernel_w,
            const uint stride_h, const uint stride_w, const uint pad_top, const uint pad_left,
            const uint dilation_h, const uint dilation_w, const uint ldx, __global const float *x,
            __global float *xt)
{
    const uint m = get_global_id(0);
    const uint k = get_global_id(1);
    const uint pixels = out_h * out_w;
    const uint m_total = batch * pixels;
    if (m >= ldx || k >= channels * kernel_h * kernel_w) {
        return;
    }
    if (m >= m_total) {
        xt[(size_t)k * ldx + m] = 0.0f;
        return;
    }
    const uint c = k / (kernel_h * kernel_w);
    const uint i = (k / kernel_w) % kernel_h;
    const uint j = k % kernel_w;
    const uint b = m / pixels;
    const uint p = m % pixels;
    // Signed: the first rows and columns of a padded conv start above and left of the image.
    const int ih = (int)((p / out_w) * stride_h + i * dilation_h) - (int)pad_top;
    const int iw = (int)((p % out_w) * stride_w + j * dilation_w) - (int)pad_left;
    const bool inside = ih >= 0 && ih < (int)height && iw >= 0 && iw < (int)width;
    xt[(size_t)k * ldx + m] =
        inside ? x[(((size_t)b * channels + c) * height + (uint)ih) * width + (uint)iw] : 0.0f;
}
