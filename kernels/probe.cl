// probe.cl: y = a*x + y over float, one element per work-item.
//
// `polaris-opt devices --check` builds and runs this to confirm a device really compiles and
// executes our kernels with its profile's -D defines (OpenCL C 1.2, so every Polaris driver
// can build it). LOCAL_SIZE comes from the profile's WAVEFRONT; a fixed local size also keeps
// PoCL from compiling a new variant for each launch.

#ifndef WAVEFRONT
#error "build with -DWAVEFRONT=<n> from the device profile"
#endif
#ifndef LOCAL_SIZE
#define LOCAL_SIZE WAVEFRONT
#endif

__kernel __attribute__((reqd_work_group_size(LOCAL_SIZE, 1, 1)))
void probe_axpy(const float a, __global const float *x, __global float *y, const uint n)
{
    const uint i = get_global_id(0);
    if (i < n) {  // the global size is rounded up to a multiple of LOCAL_SIZE
        y[i] = a * x[i] + y[i];
    }
}
