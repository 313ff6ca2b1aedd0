// One LSTM time step's elementwise work, forward and backward, fused into one pass each (CPU).
//
// The reference twin is the torch-op step in accel/nn/fused_recurrence.py (tests compare the two).
// The GEMMs stay torch's (addmm/mm); what this replaces is ~12 small torch ops per forward step and ~4
// per backward step, each a pass over the step's rows plus a dispatch. Built at first use by
// accel/nn/recurrence_kernel.py (g++ -O3 -march=native, no -ffast-math, see exp_clamped); plain C ABI,
// called through ctypes with raw pointers: every row block is contiguous, gates rows are 4*H wide.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

// exp as 2^n * P(r) (Cody-Waite reduction, Taylor polynomial on |r| <= ln2/2: ~1e-15 relative error for
// double with degree 12, ~1e-8 for float with degree 7), written so that gcc vectorises it without -ffast-math: IEEE semantics kept
// (NaN propagates), no libmvec, and no crtfastmath.o (which -ffast-math links and which sets
// flush-to-zero for the whole process when the library loads). The argument is clamped to +-80, where
// sigmoid and tanh are already 0 or +-1 to working precision.
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
    int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;  // 2^n as a double; |n| <= 116
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * T(scale);
}
template <typename T> static inline T sigmoid(T x) { return T(1) / (T(1) + exp_clamped(-x)); }
template <typename T> static inline T tanh_by_exp(T x) { return T(2) / (T(1) + exp_clamped(T(-2) * x)) - T(1); }

// gates: (rows, 4H) pre-activations i, f, g, o -> activated in place.
// c_prev: (rows, H); c_out, h_out: (rows, H). factors (rows, 4H) and from_hidden (rows, H) may be null
// (inference): d pre-activation per unit of dc for i, f, g, per unit of dh for o, and dc/dh = o (1 - tanh(c)^2).
template <typename T>
static void forward_step(int64_t rows, int64_t H, T* gates, const T* c_prev, T* c_out, T* h_out, T* factors,
                         T* from_hidden) {
    std::vector<T> scratch(factors != nullptr ? 0 : H);
    T* tanh_scratch = scratch.data();
    for (int64_t r = 0; r < rows; ++r) {
        T* g = gates + r * 4 * H;
        const T* cp = c_prev + r * H;
        T* co = c_out + r * H;
        T* ho = h_out + r * H;
        // tanh(c) is kept in from_hidden for the second pass (in tanh_scratch at inference)
        T* fh = factors != nullptr ? from_hidden + r * H : tanh_scratch;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            T i = sigmoid(g[j]), f = sigmoid(g[H + j]), gg = tanh_by_exp(g[2 * H + j]), o = sigmoid(g[3 * H + j]);
            g[j] = i; g[H + j] = f; g[2 * H + j] = gg; g[3 * H + j] = o;
            T c = f * cp[j] + i * gg;
            T tc = tanh_by_exp(c);
            co[j] = c;
            ho[j] = o * tc;
            fh[j] = tc;
        }
        if (factors == nullptr) continue;
        T* fa = factors + r * 4 * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
            T tc = fh[j];  // not h / o: a saturated o underflows to 0
            fa[j] = i * (T(1) - i) * gg;
            fa[H + j] = f * (T(1) - f) * cp[j];
            fa[2 * H + j] = i * (T(1) - gg * gg);
            fa[3 * H + j] = o * (T(1) - o) * tc;
            fh[j] = o * (T(1) - tc * tc);
        }
    }
}

// dh: (rows, H) the hidden gradient of this step; dc: (rows, H) in: the cell gradient from later steps,
// out: the gradient of the previous cell state. grad_gates: (rows, 4H) out. gates: the activated gates (f).
template <typename T>
static void backward_step(int64_t rows, int64_t H, const T* dh, T* dc, const T* factors, const T* from_hidden,
                          const T* gates, T* grad_gates) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* d = dh + r * H;
        T* c = dc + r * H;
        const T* fa = factors + r * 4 * H;
        const T* fh = from_hidden + r * H;
        const T* f = gates + r * 4 * H + H;
        T* gg = grad_gates + r * 4 * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            T cell = c[j] + d[j] * fh[j];
            gg[j] = fa[j] * cell;
            gg[H + j] = fa[H + j] * cell;
            gg[2 * H + j] = fa[2 * H + j] * cell;
            gg[3 * H + j] = fa[3 * H + j] * d[j];
            c[j] = cell * f[j];
        }
    }
}

extern "C" {
void lstm_forward_step_f32(int64_t rows, int64_t H, float* gates, const float* c_prev, float* c_out, float* h_out,
                           float* factors, float* from_hidden) {
    forward_step<float>(rows, H, gates, c_prev, c_out, h_out, factors, from_hidden);
}
void lstm_forward_step_f64(int64_t rows, int64_t H, double* gates, const double* c_prev, double* c_out,
                           double* h_out, double* factors, double* from_hidden) {
    forward_step<double>(rows, H, gates, c_prev, c_out, h_out, factors, from_hidden);
}
void lstm_backward_step_f32(int64_t rows, int64_t H, const float* dh, float* dc, const float* factors,
                            const float* from_hidden, const float* gates, float* grad_gates) {
    backward_step<float>(rows, H, dh, dc, factors, from_hidden, gates, grad_gates);
}
void lstm_backward_step_f64(int64_t rows, int64_t H, const double* dh, double* dc, const double* factors,
                            const double* from_hidden, const double* gates, double* grad_gates) {
    backward_step<double>(rows, H, dh, dc, factors, from_hidden, gates, grad_gates);
}
}
