// One LSTM time step's elementwise work, forward and backward, fused into one pass each (CPU).
//
// The reference twin is the torch-op step in accel/nn/recurrence/_fused.py (tests compare the two).
// The GEMMs stay torch's (mm); what this replaces is the input and bias adds and ~10 small torch ops per
// forward step and ~6 per backward step, each a pass over the step's rows plus a dispatch. Built at first
// use by accel/nn/recurrence/_kernel.py (g++ -O3 -march=native, no -ffast-math, see exp_clamped); plain C
// ABI, called through ctypes with raw pointers. The C code trusts them: the Python wrapper checks every
// tensor first (dtype, CPU, contiguous, at least `rows` rows, gate rows 4*H wide, state rows H wide).
//
// The forward keeps only what an LSTM must (the activated gates and the cell states); the backward
// recomputes tanh(c) and the activation derivatives from them: that costs a few vector ops per element,
// where saving them cost a (T, B, 5H) buffer more, written forward and read backward (memory traffic
// and, on a fresh allocation, page faults).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>

// 2^n for an integer-valued n, |n| <= 116, built in the exponent bits of T (float or double).
static inline float power_of_two(float n) {
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return scale;
}
static inline double power_of_two(double n) {
    int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return scale;
}

// exp as 2^n * P(r) (Cody-Waite reduction, Taylor polynomial on |r| <= ln2/2: ~1e-15 relative error for
// double with degree 12, ~1e-8 for float with degree 7), written so that gcc vectorises it without
// -ffast-math: IEEE semantics kept (NaN propagates), no libmvec, and no crtfastmath.o (which -ffast-math
// links and which sets flush-to-zero for the whole process when the library loads). The argument is
// clamped to +-80, where sigmoid and tanh are already 0 or +-1 to working precision.
template <typename T> static inline T exp_clamped(T x) {
    x = std::max(std::min(x, T(80)), T(-80));  // NaN passes through both
    T n = std::nearbyint(x * T(1.4426950408889634));
    T r = (x - n * T(0.693145751953125)) - n * T(1.4286068203094172e-06);
    T p;
    if constexpr (sizeof(T) == 4) {  // degree 7: r^8 / 8! < 1e-8 on |r| <= ln2/2
        p = T(1) / T(5040);
        for (T coefficient : {T(1) / T(720), T(1) / T(120), T(1) / T(24), T(1) / T(6), T(0.5), T(1), T(1)})
            p = p * r + coefficient;
    } else {  // degree 12
        p = T(1) / T(479001600);
        for (T coefficient : {T(1) / T(39916800), T(1) / T(3628800), T(1) / T(362880), T(1) / T(40320),
                              T(1) / T(5040), T(1) / T(720), T(1) / T(120), T(1) / T(24), T(1) / T(6), T(0.5), T(1),
                              T(1)})
            p = p * r + coefficient;
    }
    return p * power_of_two(n);
}
template <typename T> static inline T sigmoid(T x) { return T(1) / (T(1) + exp_clamped(-x)); }
template <typename T> static inline T tanh_by_exp(T x) { return T(2) / (T(1) + exp_clamped(T(-2) * x)) - T(1); }

// The rows of a step are split into `blocks` equal runs, one task each: in parallel on the OpenMP threads
// when the library is built with -fopenmp (it then shares torch's libgomp, so torch.set_num_threads holds),
// one after the other when not. The backward's bias sums are kept per block, so the result does not depend
// on which thread ran a block.
static inline int64_t block_start(int64_t block, int64_t blocks, int64_t rows) { return block * rows / blocks; }

// inputs: (rows, 4H) this step's input projections x W_ih^T + b_ih; hidden: (rows, 4H) h W_hh^T; bias: (4H)
// b_hh. gates: (rows, 4H) out, the activated gates i, f, g, o. c_prev: (rows, H); c_out, h_out: (rows, H).
template <typename T>
static void forward_step(int64_t rows, int64_t H, int64_t blocks, const T* inputs, const T* hidden, const T* bias,
                         T* gates, const T* c_prev, T* c_out, T* h_out) {
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t block = 0; block < blocks; ++block) {
        for (int64_t r = block_start(block, blocks, rows); r < block_start(block + 1, blocks, rows); ++r) {
            const T* x = inputs + r * 4 * H;
            const T* hw = hidden + r * 4 * H;
            T* g = gates + r * 4 * H;
            const T* cp = c_prev + r * H;
            T* co = c_out + r * H;
            T* ho = h_out + r * H;
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {  // summed as addmm(x, h, W^T) + b_hh would: (x + h W^T) + b_hh
                T i = sigmoid((x[j] + hw[j]) + bias[j]), f = sigmoid((x[H + j] + hw[H + j]) + bias[H + j]);
                T gg = tanh_by_exp((x[2 * H + j] + hw[2 * H + j]) + bias[2 * H + j]);
                T o = sigmoid((x[3 * H + j] + hw[3 * H + j]) + bias[3 * H + j]);
                g[j] = i; g[H + j] = f; g[2 * H + j] = gg; g[3 * H + j] = o;
                T c = f * cp[j] + i * gg;
                co[j] = c;
                ho[j] = o * tanh_by_exp(c);
            }
        }
    }
}

// dh: (rows, H) the hidden gradient of this step; dc: (rows, H) in: the cell gradient from later steps,
// out: the gradient of the previous cell state. gates: the activated gates; c, c_prev: (rows, H) this
// step's and the previous step's cell state. grad_gates: (rows, 4H) out, the pre-activation gradients.
// grad_bias: (blocks, 4H) out, the sums of grad_gates over each block's rows (the step's b_hh gradient).
template <typename T>
static void backward_step(int64_t rows, int64_t H, int64_t blocks, const T* dh, T* dc, const T* gates,
                          const T* cell, const T* c_prev, T* grad_gates, T* grad_bias) {
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t block = 0; block < blocks; ++block) {
        T* sums = grad_bias + block * 4 * H;
        std::fill(sums, sums + 4 * H, T(0));
        for (int64_t r = block_start(block, blocks, rows); r < block_start(block + 1, blocks, rows); ++r) {
            const T* d = dh + r * H;
            T* dcr = dc + r * H;
            const T* g = gates + r * 4 * H;
            const T* c = cell + r * H;
            const T* cp = c_prev + r * H;
            T* out = grad_gates + r * 4 * H;
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
                T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
                T tc = tanh_by_exp(c[j]);
                T total = dcr[j] + d[j] * o * (T(1) - tc * tc);
                T di = total * gg * i * (T(1) - i), df = total * cp[j] * f * (T(1) - f);
                T dg = total * i * (T(1) - gg * gg), d_o = d[j] * tc * o * (T(1) - o);
                out[j] = di; out[H + j] = df; out[2 * H + j] = dg; out[3 * H + j] = d_o;
                sums[j] += di; sums[H + j] += df; sums[2 * H + j] += dg; sums[3 * H + j] += d_o;
                dcr[j] = total * f;
            }
        }
    }
}

extern "C" {
void lstm_forward_step_f32(int64_t rows, int64_t H, int64_t blocks, const float* inputs, const float* hidden,
                           const float* bias, float* gates, const float* c_prev, float* c_out, float* h_out) {
    forward_step<float>(rows, H, blocks, inputs, hidden, bias, gates, c_prev, c_out, h_out);
}
void lstm_forward_step_f64(int64_t rows, int64_t H, int64_t blocks, const double* inputs, const double* hidden,
                           const double* bias, double* gates, const double* c_prev, double* c_out, double* h_out) {
    forward_step<double>(rows, H, blocks, inputs, hidden, bias, gates, c_prev, c_out, h_out);
}
void lstm_backward_step_f32(int64_t rows, int64_t H, int64_t blocks, const float* dh, float* dc, const float* gates,
                            const float* cell, const float* c_prev, float* grad_gates, float* grad_bias) {
    backward_step<float>(rows, H, blocks, dh, dc, gates, cell, c_prev, grad_gates, grad_bias);
}
void lstm_backward_step_f64(int64_t rows, int64_t H, int64_t blocks, const double* dh, double* dc,
                            const double* gates, const double* cell, const double* c_prev, double* grad_gates,
                            double* grad_bias) {
    backward_step<double>(rows, H, blocks, dh, dc, gates, cell, c_prev, grad_gates, grad_bias);
}
}
