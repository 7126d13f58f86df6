// Stand-in kernels for the compile harness (tests/kernels_compile.rs and
// examples/kernel_report.rs) until the backend's own kernel sources are wired in: one
// element-wise kernel and one shared-memory row reduction, header-free like the real ones
// (bf16 as raw 16-bit words, no CUDA headers), so every part of the harness is exercised:
// registers, static shared memory, barriers, and the budget table.

// The f32 whose upper 16 bits are the bf16 `bits` (exact).
float bf16_to_f32(unsigned short bits) {
    return __uint_as_float(((unsigned int)bits) << 16);
}

// y[i] += a * x[i] for i < n, x in bf16.
extern "C" __global__ void stand_in_axpy_bf16(float* y, const unsigned short* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = y[i] + a * bf16_to_f32(x[i]);
    }
}

// out[row] = sum of x[row, 0..cols), one block of 256 threads per row: each thread sums a
// strided slice in ascending order, then a fixed tree over shared memory (the same order for
// every row and every launch).
extern "C" __global__ void stand_in_row_sum(float* out, const float* x, int cols) {
    __shared__ float partial[256];
    const float* row = x + (long long)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 256) {
        sum = sum + row[c];
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = 128; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] = partial[threadIdx.x] + partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[blockIdx.x] = partial[0];
    }
}
