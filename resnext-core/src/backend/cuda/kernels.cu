// The CUDA backend's own kernels, compiled by NVRTC when a GPU is opened (and in CI, so
// an error here fails the build's tests). NCHW float32 throughout; every index that can
// pass 2^31 is 64-bit. Each kernel is a grid-stride loop, so any grid size is correct.

// y[i] = act(y[i] + shift[channel of i] + (res ? res[i] : 0)): the epilogue of a
// convolution whose batch norm is folded into its weights. act is a ReLU when relu != 0
// (NaN passes through, as in PyTorch).
extern "C" __global__ void bias_residual_act(float* __restrict__ y,
                                             const float* __restrict__ shift,
                                             const float* __restrict__ res,
                                             int relu, long long total, int channels,
                                             long long plane) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)((i / plane) % channels);
        float v = y[i] + shift[c];
        if (res != nullptr) v += res[i];
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = v;
    }
}

// Max pooling, square window k, stride s, padding p (padding never wins: -inf). A NaN in
// the window gives NaN, as in PyTorch.
extern "C" __global__ void max_pool2d(const float* __restrict__ x, float* __restrict__ y,
                                      long long planes, int h, int w, int oh, int ow, int k,
                                      int s, int p) {
    long long total = planes * oh * ow;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ox = (int)(i % ow);
        int oy = (int)((i / ow) % oh);
        long long plane = i / ((long long)oh * ow);
        const float* src = x + plane * h * w;
        float m = __int_as_float(0xff800000);  // -inf
        for (int ky = 0; ky < k; ++ky) {
            int iy = oy * s - p + ky;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < k; ++kx) {
                int ix = ox * s - p + kx;
                if (ix < 0 || ix >= w) continue;
                float v = src[iy * w + ix];
                if (v > m || v != v) m = v;
                if (m != m) break;
            }
        }
        y[i] = m;
    }
}

// y[r] = mean of the `plane` values of row r (global average pooling: one row a channel
// of an image). One warp a row.
extern "C" __global__ void global_avg_pool(const float* __restrict__ x, float* __restrict__ y,
                                           long long rows, int plane) {
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; r < rows;
         r += warps) {
        const float* src = x + r * plane;
        float acc = 0.0f;
        for (int j = lane; j < plane; j += 32) acc += src[j];
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) y[r] = acc / (float)plane;
    }
}

// y[r][c] += b[c] for a row-major (rows, cols) matrix: the classifier's bias.
extern "C" __global__ void add_bias_rows(float* __restrict__ y, const float* __restrict__ b,
                                         long long rows, int cols) {
    long long total = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] += b[i % cols];
    }
}
