// The CUDA backend's own kernels, compiled by NVRTC when a GPU is opened (and in CI, so
// an error here fails the build's tests). NCHW; every index that can pass 2^31 is 64-bit.
// Each kernel is a grid-stride loop, so any grid size is correct.
//
// Activations and their gradients are `act_t`: float, or bfloat16 when compiled with
// ACT_BF16 (mixed precision: the source is compiled once for the precision the GPU was
// opened with). Parameters, their gradients, batch-norm statistics, pooled features and
// logits are float in both, and every kernel computes in float.

#ifdef ACT_BF16
typedef unsigned short act_t;
__device__ __forceinline__ float ld(act_t v) { return __uint_as_float(((unsigned)v) << 16); }
// float -> bfloat16, rounded to nearest even; a NaN stays a (quiet) NaN
__device__ __forceinline__ act_t st(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (act_t)((u >> 16) | 0x40u);
    return (act_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#else
typedef float act_t;
__device__ __forceinline__ float ld(act_t v) { return v; }
__device__ __forceinline__ act_t st(float f) { return f; }
#endif

// y = x in the activations' precision: a batch copied to the GPU as float.
extern "C" __global__ void to_act(const float* __restrict__ x, act_t* __restrict__ y,
                                  long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = st(x[i]);
}

// out += x: a weight's gradient from cuDNN's backward filter, in the activations'
// precision, added to its float gradient.
extern "C" __global__ void add_act_to_float(const act_t* __restrict__ x,
                                            float* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] += ld(x[i]);
}
// out = x, or out += x when accumulate: a float gradient (max pooling's, summed by
// atomic adds) written to an activation's.
extern "C" __global__ void float_to_act(const float* __restrict__ x, act_t* __restrict__ out,
                                        long long n, int accumulate) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = st(accumulate ? ld(out[i]) + x[i] : x[i]);
}

// y[i] = act(y[i] + shift[channel of i] + (res ? res[i] : 0)): the epilogue of a
// convolution whose batch norm is folded into its weights. act is a ReLU when relu != 0
// (NaN passes through, as in PyTorch).
extern "C" __global__ void bias_residual_act(act_t* __restrict__ y,
                                             const float* __restrict__ shift,
                                             const act_t* __restrict__ res,
                                             int relu, long long total, int channels,
                                             long long plane) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)((i / plane) % channels);
        float v = ld(y[i]) + shift[c];
        if (res != nullptr) v += ld(res[i]);
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = st(v);
    }
}

// The maximum of the k×k window (stride s, padding p) of output i of max pooling planes
// of h×w into oh×ow, and in *at the index in x it came from: the first maximum; a NaN
// wins (as in PyTorch), and padding never does (-1 for a window of padding only, whose
// maximum is -inf).
__device__ __forceinline__ float window_max(const act_t* __restrict__ x, long long i, int h,
                                            int w, int oh, int ow, int k, int s, int p,
                                            long long* at) {
    const int ox = (int)(i % ow);
    const int oy = (int)((i / ow) % oh);
    const long long base = i / ((long long)oh * ow) * h * w;
    float m = __int_as_float(0xff800000);  // -inf
    long long arg = -1;
    for (int ky = 0; ky < k; ++ky) {
        int iy = oy * s - p + ky;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
            int ix = ox * s - p + kx;
            if (ix < 0 || ix >= w) continue;
            float v = ld(x[base + iy * w + ix]);
            if (arg < 0 || v > m || v != v) {
                m = v;
                arg = base + iy * w + ix;
                if (v != v) {
                    *at = arg;
                    return m;
                }
            }
        }
    }
    *at = arg;
    return m;
}

// Max pooling, square window k, stride s, padding p.
extern "C" __global__ void max_pool2d(const act_t* __restrict__ x, act_t* __restrict__ y,
                                      long long planes, int h, int w, int oh, int ow, int k,
                                      int s, int p) {
    long long total = planes * oh * ow, at;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = st(window_max(x, i, h, w, oh, ow, k, s, p, &at));
}

// y[r] = mean of the `plane` values of row r (global average pooling: one row a channel
// of an image). One warp a row.
extern "C" __global__ void global_avg_pool(const act_t* __restrict__ x, float* __restrict__ y,
                                           long long rows, int plane) {
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; r < rows;
         r += warps) {
        const act_t* src = x + r * plane;
        float acc = 0.0f;
        for (int j = lane; j < plane; j += 32) acc += ld(src[j]);
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

// ---- training ------------------------------------------------------------------------
// Per-channel kernels loop over channels by block (one block a channel at a time) and
// over the channel's n·plane values by thread; sums are taken in double, so a channel of
// millions of values keeps its mean and variance to float precision.

// The sum of v over the block, valid in thread 0. blockDim.x is a multiple of 32.
__device__ double block_sum(double v, double* shared) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous call's readers are done with `shared`
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? shared[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// The index of the j-th value of channel c in an (n, channels, plane) tensor.
__device__ __forceinline__ long long chan_index(long long j, int c, int channels,
                                                long long plane) {
    long long img = j / plane;
    return (img * channels + c) * plane + (j - img * plane);
}

// Batch statistics of z (n, channels, plane): mean and 1/sqrt(biased var + eps) per
// channel, and the running statistics updated as PyTorch does (momentum, unbiased var).
extern "C" __global__ void bn_stats(const act_t* __restrict__ z, float* __restrict__ mean,
                                    float* __restrict__ invstd, float* __restrict__ run_mean,
                                    float* __restrict__ run_var, int n, int channels,
                                    long long plane, double eps, double momentum) {
    __shared__ double shared[32];
    __shared__ double mu_shared;
    const long long m = (long long)n * plane;
    for (int c = blockIdx.x; c < channels; c += gridDim.x) {
        double s = 0.0;
        for (long long j = threadIdx.x; j < m; j += blockDim.x) s += ld(z[chan_index(j, c, channels, plane)]);
        s = block_sum(s, shared);
        if (threadIdx.x == 0) mu_shared = s / (double)m;
        __syncthreads();
        const double mu = mu_shared;
        double q = 0.0;
        for (long long j = threadIdx.x; j < m; j += blockDim.x) {
            double d = (double)ld(z[chan_index(j, c, channels, plane)]) - mu;
            q += d * d;
        }
        q = block_sum(q, shared);
        if (threadIdx.x == 0) {
            const double var = q / (double)m;
            mean[c] = (float)mu;
            invstd[c] = (float)(1.0 / sqrt(var + eps));
            const double unbiased = m > 1 ? var * (double)m / (double)(m - 1) : var;
            run_mean[c] = (float)((1.0 - momentum) * (double)run_mean[c] + momentum * mu);
            run_var[c] = (float)((1.0 - momentum) * (double)run_var[c] + momentum * unbiased);
        }
        __syncthreads();  // mu_shared is rewritten for the next channel
    }
}

// Batch statistics over a group of GPUs (synchronised batch norm), in three steps with a
// sum over the group after each of the first two. bn_moments: out[c] = Σ z over the
// channel (sums null), or Σ (z − μ)² with μ = sums[c] / count (the group's mean).
extern "C" __global__ void bn_moments(const act_t* __restrict__ z,
                                      const double* __restrict__ sums, double count,
                                      double* __restrict__ out, int n, int channels,
                                      long long plane) {
    __shared__ double shared[32];
    const long long m = (long long)n * plane;
    for (int c = blockIdx.x; c < channels; c += gridDim.x) {
        const double mu = sums != nullptr ? sums[c] / count : 0.0;
        double s = 0.0;
        for (long long j = threadIdx.x; j < m; j += blockDim.x) {
            double v = (double)ld(z[chan_index(j, c, channels, plane)]);
            s += sums != nullptr ? (v - mu) * (v - mu) : v;
        }
        s = block_sum(s, shared);
        if (threadIdx.x == 0) out[c] = s;
    }
}

// bn_stats's results from the group's sums: the mean, 1/sqrt(biased var + eps) and the
// running statistics (momentum, unbiased var) of `count` values a channel.
extern "C" __global__ void bn_stats_finish(const double* __restrict__ sums,
                                           const double* __restrict__ squares, double count,
                                           float* __restrict__ mean,
                                           float* __restrict__ invstd,
                                           float* __restrict__ run_mean,
                                           float* __restrict__ run_var, int channels,
                                           double eps, double momentum) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < channels;
         c += gridDim.x * blockDim.x) {
        const double mu = sums[c] / count, var = squares[c] / count;
        mean[c] = (float)mu;
        invstd[c] = (float)(1.0 / sqrt(var + eps));
        const double unbiased = count > 1.0 ? var * count / (count - 1.0) : var;
        run_mean[c] = (float)((1.0 - momentum) * (double)run_mean[c] + momentum * mu);
        run_var[c] = (float)((1.0 - momentum) * (double)run_var[c] + momentum * unbiased);
    }
}

// y = act(gamma (z - mean) invstd + beta + res): training-mode batch norm's output.
extern "C" __global__ void bn_apply(const act_t* __restrict__ z, act_t* __restrict__ y,
                                    const float* __restrict__ mean,
                                    const float* __restrict__ invstd,
                                    const float* __restrict__ gamma,
                                    const float* __restrict__ beta,
                                    const act_t* __restrict__ res, int relu, long long total,
                                    int channels, long long plane) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)((i / plane) % channels);
        float v = (ld(z[i]) - mean[c]) * invstd[c] * gamma[c] + beta[c];
        if (res != nullptr) v += ld(res[i]);
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = st(v);
    }
}

// The gradient reaching the batch norm: dy, through the ReLU when there is one (passed
// where the output is positive, as PyTorch's threshold backward does).
__device__ __forceinline__ float act_grad(const act_t* dy, const act_t* y, int relu,
                                          long long i) {
    return (relu && !(ld(y[i]) > 0.0f)) ? 0.0f : ld(dy[i]);
}

// Per channel: s1 = Σ g and s2 = Σ g·x̂ (g the gradient after the ReLU, x̂ the normalised
// input), written to sums[c] and sums[channels + c] and added to β's and γ's gradients.
extern "C" __global__ void bn_backward_reduce(const act_t* __restrict__ dy,
                                              const act_t* __restrict__ y,
                                              const act_t* __restrict__ z,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ invstd, int relu,
                                              float* __restrict__ sums,
                                              float* __restrict__ dgamma,
                                              float* __restrict__ dbeta, int n, int channels,
                                              long long plane) {
    __shared__ double shared[32];
    const long long m = (long long)n * plane;
    for (int c = blockIdx.x; c < channels; c += gridDim.x) {
        const float mu = mean[c], is = invstd[c];
        double s1 = 0.0, s2 = 0.0;
        for (long long j = threadIdx.x; j < m; j += blockDim.x) {
            long long i = chan_index(j, c, channels, plane);
            float g = act_grad(dy, y, relu, i);
            s1 += g;
            s2 += (double)g * (double)((ld(z[i]) - mu) * is);
        }
        s1 = block_sum(s1, shared);
        s2 = block_sum(s2, shared);
        if (threadIdx.x == 0) {
            sums[c] = (float)s1;
            sums[channels + c] = (float)s2;
            dbeta[c] += (float)s1;
            dgamma[c] += (float)s2;
        }
    }
}

// dz = γ·invstd·(g − s1/m − x̂·s2/m), the batch norm's input gradient (m = n·plane), and
// dres (+)= g, the residual's, when dres is not null.
extern "C" __global__ void bn_backward_apply(const act_t* __restrict__ dy,
                                             const act_t* __restrict__ y,
                                             const act_t* __restrict__ z,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ invstd,
                                             const float* __restrict__ gamma,
                                             const float* __restrict__ sums, int relu,
                                             act_t* __restrict__ dz, act_t* __restrict__ dres,
                                             int accumulate, long long total, int channels,
                                             long long plane, long long m) {
    const float inv_m = 1.0f / (float)m;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)((i / plane) % channels);
        float g = act_grad(dy, y, relu, i);
        float xhat = (ld(z[i]) - mean[c]) * invstd[c];
        dz[i] = st(gamma[c] * invstd[c] * (g - sums[c] * inv_m - xhat * sums[channels + c] * inv_m));
        if (dres != nullptr) dres[i] = st(accumulate ? ld(dres[i]) + g : g);
    }
}

// The eval-mode (frozen) convolution's epilogue backward: dz = g (the shift has no
// gradient that is kept) and dres (+)= g when dres is not null.
extern "C" __global__ void act_backward(const act_t* __restrict__ dy,
                                        const act_t* __restrict__ y, int relu,
                                        act_t* __restrict__ dz, act_t* __restrict__ dres,
                                        int accumulate, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float g = act_grad(dy, y, relu, i);
        dz[i] = st(g);
        if (dres != nullptr) dres[i] = st(accumulate ? ld(dres[i]) + g : g);
    }
}

// Max pooling's backward: each output's gradient added to the input its window took
// (window_max's, as the forward). dx, float (atomic adds), must hold 0 or what to add to.
extern "C" __global__ void max_pool2d_backward(const act_t* __restrict__ x,
                                               const act_t* __restrict__ dy,
                                               float* __restrict__ dx, long long planes, int h,
                                               int w, int oh, int ow, int k, int s, int p) {
    long long total = planes * oh * ow, at;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        window_max(x, i, h, w, oh, ow, k, s, p, &at);
        if (at >= 0) atomicAdd(dx + at, ld(dy[i]));
    }
}

// Global average pooling's backward: dx[r][j] (+)= dp[r] / plane.
extern "C" __global__ void avg_pool_backward(const float* __restrict__ dp,
                                             act_t* __restrict__ dx, long long rows, int plane,
                                             int accumulate) {
    long long total = rows * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float g = dp[i / plane] / (float)plane;
        dx[i] = st(accumulate ? ld(dx[i]) + g : g);
    }
}

// out[c] += Σ_r d[r][c] for a row-major (rows, cols) matrix: the classifier bias's
// gradient.
extern "C" __global__ void col_sum_add(const float* __restrict__ d, float* __restrict__ out,
                                       long long rows, int cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        double s = 0.0;
        for (long long r = 0; r < rows; ++r) s += d[r * cols + c];
        out[c] += (float)s;
    }
}

// Cross-entropy of row-major logits (rows, cols) against soft targets: class a[r] with
// weight lam, class b[r] with 1 − lam (b null: lam is 1), smoothed by eps (the target of
// class j is eps/cols + (1 − eps)·onehot). loss[r] is the row's loss; dlogits (softmax −
// target) / rows, the mean loss's gradient. One warp a row.
extern "C" __global__ void cross_entropy(const float* __restrict__ logits,
                                         const int* __restrict__ a, const int* __restrict__ b,
                                         float lam, float eps, long long rows, int cols,
                                         float* __restrict__ loss,
                                         float* __restrict__ dlogits) {
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; r < rows;
         r += warps) {
        const float* z = logits + r * cols;
        float mx = __int_as_float(0xff800000);
        for (int j = lane; j < cols; j += 32) mx = fmaxf(mx, z[j]);
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        double se = 0.0;
        for (int j = lane; j < cols; j += 32) se += exp((double)z[j] - (double)mx);
        for (int off = 16; off > 0; off >>= 1) se += __shfl_xor_sync(0xffffffffu, se, off);
        const double lse = (double)mx + log(se);
        const int ca = a[r], cb = b != nullptr ? b[r] : -1;
        const double wa = b != nullptr ? (double)lam : 1.0;
        double l = 0.0;
        for (int j = lane; j < cols; j += 32) {
            double q = (double)eps / cols;
            if (j == ca) q += (1.0 - eps) * wa;
            if (j == cb) q += (1.0 - eps) * (1.0 - wa);
            double logp = (double)z[j] - lse;
            l -= q * logp;
            dlogits[r * cols + j] = (float)((exp(logp) - q) / (double)rows);
        }
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        if (lane == 0) loss[r] = (float)l;
    }
}

// out += Σ g² over n values (the gradients' global norm, for clipping).
extern "C" __global__ void sum_squares(const float* __restrict__ g, long long n,
                                       double* __restrict__ out) {
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        s += (double)g[i] * (double)g[i];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}

// SGD as torch.optim.SGD: g = clip·grad + decay·p (clip scales the gradient: clipping by
// the global norm, and 1/N for a gradient summed over N GPUs); with momentum mu, buf = g on the
// first step (fresh) else mu·buf + g, and the step is g + mu·buf (Nesterov) or buf;
// p -= lr·step. buf is null when mu is 0.
extern "C" __global__ void sgd_step(float* __restrict__ p, const float* __restrict__ grad,
                                    float* __restrict__ buf, long long n, float lr, float mu,
                                    float decay, float clip, int nesterov, int fresh) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float pv = p[i];
        float g = grad[i] * clip + decay * pv;
        float step = g;
        if (buf != nullptr) {
            float b = fresh ? g : mu * buf[i] + g;
            buf[i] = b;
            step = nesterov ? g + mu * b : b;
        }
        p[i] = pv - lr * step;
    }
}

// AdamW as torch.optim.AdamW: p *= shrink (1 − lr·decay); m = β1 m + (1 − β1) g;
// v = β2 v + (1 − β2) g²; p -= step_size · m / (√v / bc2_sqrt + eps), g = clip·grad.
extern "C" __global__ void adamw_step(float* __restrict__ p, const float* __restrict__ grad,
                                      float* __restrict__ m, float* __restrict__ v, long long n,
                                      float step_size, float bc2_sqrt, float beta1, float beta2,
                                      float eps, float shrink, float clip) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = grad[i] * clip;
        float pv = p[i] * shrink;
        float mv = beta1 * m[i] + (1.0f - beta1) * g;
        float vv = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mv;
        v[i] = vv;
        p[i] = pv - step_size * mv / (sqrtf(vv) / bc2_sqrt + eps);
    }
}
