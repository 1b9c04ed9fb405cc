// LGAM's GAP (eq (1)), eqs (4)-(7) on the map and their backward, one pass over the map each way,
// and eqs (2)-(3) on the pooled vectors (eval and train mode) with theirs.
//
// Built and loaded by kernels.py (g++ -O3 -march=native -fopenmp; no Python or torch headers),
// called only through its checked boundary (kernels.call) by the ops in ops.py. From the group
// scales 1 + M_k (scales below) come, per sample, the ladder weights of equations.ladder_weights,
// each (B, C) with C = G * C':
//   p = P_k = (1 + M_1) ... (1 + M_k)      eq (4) unrolled: y_k = P_k u_k, u_k = sum_{j<=k} x_j q_j
//   q = 1 / P_{k-1}
//   v = sum_{k >= j} P_k / P_{j-1}          eq (5): S = sum_c A'_c = sum_c A_c v_c
// Per position everything needs only that position's C values, so the forward computes S, the
// gate and A'' (and a residual block's ReLU(A'' + identity)) in one read of the map, and the
// backward A's gradient and the per-sample sums over positions for the scales in one read of
// the map and of the output's gradient.
//
// The map is (B, P, C) "rows" (channels_last) or (B, C, P) "columns" (contiguous). T is its dtype
// (bf16, float, double), W the arithmetic's (float; double for double). Work goes in blocks of
// L = one 64-byte register of W (16 floats, 8 doubles) positions: rows take vectors along the
// channels of a group (C' a multiple of L), columns along the block's positions; whatever does
// not fit (a narrower group, the last positions of a map) takes the scalar code, position by
// position, which is also the plainest statement of the arithmetic: read it first.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct bf16 {
  uint16_t bits;
};

typedef float f32v __attribute__((vector_size(64)));
typedef double f64v __attribute__((vector_size(64)));
typedef int32_t i32v __attribute__((vector_size(64)));
typedef int64_t i64v __attribute__((vector_size(64)));
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef uint16_t u16v __attribute__((vector_size(32)));

template <class W>
struct Vec;
template <>
struct Vec<float> {
  using type = f32v;
  using ints = i32v;
};
template <>
struct Vec<double> {
  using type = f64v;
  using ints = i64v;
};
template <class W>
using vec = typename Vec<W>::type;
template <class W>
constexpr int64_t L = 64 / sizeof(W);

// ---- loads and stores: T in memory, W in registers; bf16 rounds to nearest even, as torch ----

inline uint32_t bf16_round(uint32_t u) {
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

template <class W, class T>
inline W load(const T* x) {
  if constexpr (std::is_same_v<T, bf16>) {
    const uint32_t u = uint32_t(x->bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return W(f);
  } else {
    return W(*x);
  }
}

template <class T, class W>
inline void store(T* x, W w) {
  if constexpr (std::is_same_v<T, bf16>) {
    const float f = float(w);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x->bits = uint16_t(bf16_round(u));
  } else {
    *x = T(w);
  }
}

template <class W, class T>
inline vec<W> loadv(const T* x) {  // L<W> values
  vec<W> w;
  if constexpr (std::is_same_v<T, bf16>) {
    u16v h;
    std::memcpy(&h, x, sizeof h);
    const u32v u = __builtin_convertvector(h, u32v) << 16;
    std::memcpy(&w, &u, sizeof w);
  } else {
    static_assert(std::is_same_v<T, W>);
    std::memcpy(&w, x, sizeof w);
  }
  return w;
}

template <class T, class W>
inline void storev(T* x, vec<W> w) {
  if constexpr (std::is_same_v<T, bf16>) {
    u32v u;
    std::memcpy(&u, &w, sizeof u);
    const u32v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const u32v nan = u32v{} + 0x7fc0u;
    const u16v h = __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded, u16v);
    std::memcpy(x, &h, sizeof h);
  } else {
    std::memcpy(x, &w, sizeof w);
  }
}

template <class W>
inline W hsum(vec<W> v) {
  W s = 0;
  for (int64_t i = 0; i < L<W>; ++i) s += v[i];
  return s;
}

// ---- eq (6): M_spat = sigmoid(ReLU(S)) ----

template <class W>
inline W gate(W s) { return W(1) / (W(1) + std::exp(-std::max(s, W(0)))); }

// The same for a register of positions: exp(-ReLU(S)) as 2^n e^r, |r| <= ln2 / 2, e^r by its
// Taylor series to float's or double's precision (the vectorised libm is not at hand).
template <class W>
inline vec<W> gate(vec<W> s) {
  constexpr bool f32 = std::is_same_v<W, float>;
  constexpr W ln2_hi = f32 ? W(0.693359375) : W(6.93147180369123816490e-01);
  constexpr W ln2_lo = f32 ? W(-2.12194440e-4) : W(1.90821492927058770002e-10);
  constexpr int terms = f32 ? 8 : 13;  // r^terms / terms! below the precision
  const vec<W> zero = {};
  vec<W> x = s <= 0 ? zero : -s;  // NaN stays NaN, as in gate() above (s > 0 ? ... sent it to 0.5)
  x = x < W(f32 ? -80 : -700) ? zero + W(f32 ? -80 : -700) : x;  // e^x is 0 in 1 + e^x below
  using I = typename Vec<W>::ints;
  const I n = __builtin_convertvector(x * W(1.4426950408889634) - W(0.5), I);  // round(x / ln2)
  const vec<W> nf = __builtin_convertvector(n, vec<W>);
  const vec<W> r = x - nf * ln2_hi - nf * ln2_lo;
  vec<W> e = zero + W(1);  // Horner: 1 + r (1 + r/2 (1 + r/3 (...)))
  for (int k = terms - 1; k >= 1; --k) e = e * r * (W(1) / k) + W(1);
  const I scale_bits = (n + (f32 ? 127 : 1023)) << (f32 ? 23 : 52);  // 2^n
  vec<W> scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return W(1) / (W(1) + e * scale);
}

// The map-sized tensors at one place, all in the map's layout: the input A (x), the residual
// block's identity (id; with it the output is ReLU(A'' + identity), the block's tail in the same
// pass), the output (out); in the backward dA'' (g), the saved output (y; its sign masks g where
// the identity was added) and the identity's gradient (did). Null where unused.
template <class T>
struct Maps {
  const T *x = nullptr, *id = nullptr;
  T* out = nullptr;
  const T *g = nullptr, *y = nullptr;
  T* did = nullptr;
  Maps at(int64_t o) const {  // the same tensors o elements on
    auto on = [o](auto* t) { return t ? t + o : t; };
    return {on(x), on(id), on(out), on(g), on(y), on(did)};
  }
};

// The gate of n values in place, a register at a time.
template <class W>
inline void gate_all(W* x, int64_t n) {
  int64_t i = 0;
  for (; i + L<W> <= n; i += L<W>) {
    const vec<W> g = gate<W>(loadv<W>(x + i));
    std::memcpy(x + i, &g, sizeof g);
  }
  for (; i < n; ++i) x[i] = gate(x[i]);
}

// w[j * n ...] . x, n values (a row of a Linear's weight times its input).
template <class W>
inline W dot(const W* w, const W* x, int64_t n) {
  W acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += w[i] * x[i];
  return acc;
}

// ---- the forward ----

// eq (7), and the block's tail with an identity: ReLU(A'' + identity)
template <bool RES, class W>
inline W tail(W a2, W id) { return RES ? std::max(a2 + id, W(0)) : a2; }
template <bool RES, class W>
inline vec<W> tail(vec<W> a2, vec<W> id) {
  if constexpr (RES) {
    const vec<W> o = a2 + id;
    return o <= 0 ? vec<W>{} : o;  // NaN stays NaN, as std::max above
  }
  return a2;
}

// Scalar: one position, channel c at offset c * cs.
template <bool RES, class T, class W>
inline W forward_one(Maps<T> m, int64_t cs, const W* p, const W* q, const W* v, int64_t G,
                     int64_t Cg) {
  W s = 0;
  for (int64_t c = 0; c < G * Cg; ++c) s += load<W>(m.x + c * cs) * v[c];  // eq (5): S = A v
  const W gate_ = gate(s);                                                 // eq (6)
  for (int64_t i = 0; i < Cg; ++i) {  // the ladder along the groups, channel by channel
    W u = 0;
    for (int64_t c = i; c < G * Cg; c += Cg) {
      const W xv = load<W>(m.x + c * cs);
      u += xv * q[c];  // eq (4): y_k = P_k u_k; eq (7): A'' = A' M_spat + A
      store(m.out + c * cs, tail<RES>(xv + u * p[c] * gate_, RES ? load<W>(m.id + c * cs) : W(0)));
    }
  }
  return s;
}

// Rows: n <= L positions of C channels; vectors along the channels of a group.
template <bool RES, class T, class W>
inline void forward_rows(Maps<T> m, const W* p, const W* q, const W* v, W* s, int64_t n,
                         int64_t G, int64_t Cg) {
  const int64_t C = G * Cg;
  W sums[L<W>] = {}, gates[L<W>];
  for (int64_t t = 0; t < n; ++t) {
    vec<W> acc = {};
    for (int64_t c = 0; c < C; c += L<W>) acc += loadv<W>(m.x + t * C + c) * loadv<W>(v + c);
    sums[t] = s[t] = hsum<W>(acc);  // eq (5)
  }
  const vec<W> gv = gate<W>(loadv<W>(sums));  // eq (6)
  std::memcpy(gates, &gv, sizeof gates);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < Cg; i += L<W>) {
      vec<W> u = {};
      for (int64_t c = t * C + i; c < (t + 1) * C; c += Cg) {
        const vec<W> xv = loadv<W>(m.x + c);
        u += xv * loadv<W>(q + c - t * C);  // eqs (4), (7)
        const vec<W> a2 = xv + u * loadv<W>(p + c - t * C) * gates[t];
        storev<T, W>(m.out + c, tail<RES, W>(a2, RES ? loadv<W>(m.id + c) : vec<W>{}));
      }
    }
  }
}

// Columns: L positions, channel c at offset c * P; vectors along the positions.
template <bool RES, class T, class W>
inline void forward_columns(Maps<T> m, const W* p, const W* q, const W* v, W* s, int64_t G,
                            int64_t Cg, int64_t P) {
  vec<W> sv = {};
  for (int64_t c = 0; c < G * Cg; ++c) sv += loadv<W>(m.x + c * P) * v[c];  // eq (5)
  std::memcpy(s, &sv, sizeof sv);
  const vec<W> gates = gate<W>(sv);  // eq (6)
  for (int64_t i = 0; i < Cg; ++i) {
    vec<W> u = {};
    for (int64_t c = i; c < G * Cg; c += Cg) {
      const vec<W> xv = loadv<W>(m.x + c * P);
      u += xv * q[c];  // eqs (4), (7)
      const vec<W> id = RES ? loadv<W>(m.id + c * P) : vec<W>{};
      storev<T, W>(m.out + c * P, tail<RES, W>(xv + u * p[c] * gates, id));
    }
  }
}

template <bool RES, class T, class W>
void forward(Maps<T> maps, const W* p, const W* q, const W* v, W* s, int64_t B, int64_t G,
             int64_t Cg, int64_t P, bool rows) {
  const int64_t C = G * Cg, blocks = (P + L<W> - 1) / L<W>;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const W *pb = p + b * C, *qb = q + b * C, *vb = v + b * C;
      const int64_t p0 = blk * L<W>, n = std::min(L<W>, P - p0);
      W* sb = s + b * P + p0;
      if (rows && Cg % L<W> == 0) {
        forward_rows<RES>(maps.at((b * P + p0) * C), pb, qb, vb, sb, n, G, Cg);
      } else if (!rows && n == L<W>) {
        forward_columns<RES>(maps.at(b * C * P + p0), pb, qb, vb, sb, G, Cg, P);
      } else {
        for (int64_t t = 0; t < n; ++t) {
          const int64_t o = rows ? (b * P + p0 + t) * C : b * C * P + p0 + t;
          sb[t] = forward_one<RES>(maps.at(o), rows ? 1 : P, pb, qb, vb, G, Cg);
        }
      }
    }
  }
}

// ---- the backward: dA'' (or the block output's gradient) -> dA (out), the identity's
// gradient, and per sample the group scales' gradient times the scales ----
//
// With u_k = sum_{j<=k} x_j / P_{j-1} (the ladder, A'_k = P_k u_k), dA'_k = dA''_k M_spat and
// dS = dM_spat sigmoid'(S) [S > 0]: dA_j = dA''_j + dS v_j + r_j / P_{j-1}, r_j = sum_{k>=j}
// P_k dA'_k. A scale 1 + M_m enters every ratio P_k / P_{j-1} with j <= m <= k, so its gradient
// times itself is u_m sum_{k>=m} P_k (dA'_k + dS) = u_m (r_m + dS T_m), T_m = sum_{k>=m} P_k:
// summed over positions, with no cancellation between terms (ds below, per channel (B, C)).

// dA'' at offset o: the incoming gradient, masked by ReLU's where the block's tail was fused in
// (and then also the identity's gradient, written once: with `keep`).
template <bool RES, class T, class W>
inline W grad_at(const Maps<T>& m, int64_t o, bool keep) {
  if constexpr (!RES) {
    return load<W>(m.g + o);
  } else {
    const W g = load<W>(m.y + o) <= 0 ? W(0) : load<W>(m.g + o);  // as ReLU's backward: NaN passes
    if (keep) store(m.did + o, g);
    return g;
  }
}
template <bool RES, class T, class W>
inline vec<W> gradv_at(const Maps<T>& m, int64_t o, bool keep) {
  if constexpr (!RES) {
    return loadv<W>(m.g + o);
  } else {
    const vec<W> g = loadv<W>(m.y + o) <= 0 ? vec<W>{} : loadv<W>(m.g + o);
    if (keep) storev<T, W>(m.did + o, g);
    return g;
  }
}

// Per-sample weights: P_k, 1 / P_{k-1}, v and T (each C values).
template <class W>
struct Weights {
  const W *p, *q, *v, *t;
};

// Scalar: one position (channel c at offset c * cs); u: C values of scratch.
template <bool RES, class T, class W>
inline void backward_one(Maps<T> m, int64_t cs, Weights<W> w, W s, W* dl, W* u, int64_t G,
                         int64_t Cg) {
  const int64_t C = G * Cg;
  const W gate_ = gate(s);
  W dm = 0;  // dM_spat = sum_c dA''_c A'_c, with the ladder's u_k again
  for (int64_t c = 0; c < C; ++c) {
    u[c] = load<W>(m.x + c * cs) * w.q[c] + (c >= Cg ? u[c - Cg] : W(0));
    dm += grad_at<RES, T, W>(m, c * cs, false) * u[c] * w.p[c];
  }
  const W ds = s <= 0 ? W(0) : dm * gate_ * (1 - gate_);  // through eq (6); NaN passes, as ReLU's backward
  for (int64_t i = 0; i < Cg; ++i) {
    W r = 0;  // groups last to first
    for (int64_t c = C - Cg + i; c >= 0; c -= Cg) {
      const W g = grad_at<RES, T, W>(m, c * cs, true);
      r += g * gate_ * w.p[c];
      dl[c] += u[c] * (r + ds * w.t[c]);
      store(m.out + c * cs, g + ds * w.v[c] + w.q[c] * r);  // through eqs (7), (5), (4)
    }
  }
}

// Rows: n <= L positions; vectors along the channels of a group. u: C values of scratch.
template <bool RES, class T, class W>
inline void backward_rows(Maps<T> m, Weights<W> w, const W* s, W* dl, W* u, int64_t n,
                          int64_t G, int64_t Cg) {
  const int64_t C = G * Cg;
  W gates[L<W>], sums[L<W>] = {};
  std::memcpy(sums, s, n * sizeof(W));
  const vec<W> gv = gate<W>(loadv<W>(sums));
  std::memcpy(gates, &gv, sizeof gates);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t o = t * C;
    vec<W> dmv = {};
    for (int64_t i = 0; i < Cg; i += L<W>) {
      vec<W> uv = {};
      for (int64_t c = i; c < C; c += Cg) {
        uv += loadv<W>(m.x + o + c) * loadv<W>(w.q + c);
        std::memcpy(u + c, &uv, sizeof uv);
        dmv += gradv_at<RES, T, W>(m, o + c, false) * uv * loadv<W>(w.p + c);
      }
    }
    const W ds = s[t] <= 0 ? W(0) : hsum<W>(dmv) * gates[t] * (1 - gates[t]);
    for (int64_t i = 0; i < Cg; i += L<W>) {
      vec<W> r = {};
      for (int64_t c = C - Cg + i; c >= 0; c -= Cg) {
        const vec<W> g = gradv_at<RES, T, W>(m, o + c, true);
        r += g * gates[t] * loadv<W>(w.p + c);
        const vec<W> d = loadv<W>(dl + c) + loadv<W>(u + c) * (r + ds * loadv<W>(w.t + c));
        std::memcpy(dl + c, &d, sizeof d);
        storev<T, W>(m.out + o + c, g + ds * loadv<W>(w.v + c) + loadv<W>(w.q + c) * r);
      }
    }
  }
}

// Columns: L positions; vectors along them. u: C registers of scratch; dl: C registers of
// per-position partial sums, added up once per sample.
template <bool RES, class T, class W>
inline void backward_columns(Maps<T> m, Weights<W> w, const W* s, vec<W>* dl, vec<W>* u,
                             int64_t G, int64_t Cg, int64_t P) {
  const int64_t C = G * Cg;
  const vec<W> sv = loadv<W>(s), gates = gate<W>(sv), zero = {};
  vec<W> dm = {};
  for (int64_t c = 0; c < C; ++c) {
    u[c] = loadv<W>(m.x + c * P) * w.q[c] + (c >= Cg ? u[c - Cg] : zero);
    dm += gradv_at<RES, T, W>(m, c * P, false) * u[c] * w.p[c];
  }
  const vec<W> ds = sv <= 0 ? zero : dm * gates * (1 - gates);
  for (int64_t i = 0; i < Cg; ++i) {
    vec<W> r = {};
    for (int64_t c = C - Cg + i; c >= 0; c -= Cg) {
      const vec<W> g = gradv_at<RES, T, W>(m, c * P, true);
      r += g * gates * w.p[c];
      dl[c] += u[c] * (r + ds * w.t[c]);
      storev<T, W>(m.out + c * P, g + ds * w.v[c] + w.q[c] * r);
    }
  }
}

template <bool RES, class T, class W>
void backward(Maps<T> maps, const W* p, const W* q, const W* v, const W* s, W* dl, int64_t B,
              int64_t G, int64_t Cg, int64_t P, bool rows) {
  const int64_t C = G * Cg;
#pragma omp parallel
  {
    std::vector<W> u(C), t(C);
    std::vector<vec<W>> uv(C), dlv(C);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {  // a sample per thread: its sums need no locks
      const Weights<W> w{p + b * C, q + b * C, v + b * C, t.data()};
      for (int64_t c = 0; c < C; ++c) t[c] = w.v[c] / w.q[c];  // T_m = v_m P_{m-1}
      W* dlb = dl + b * C;
      std::fill(dlb, dlb + C, W(0));
      std::fill(dlv.begin(), dlv.end(), vec<W>{});
      for (int64_t p0 = 0; p0 < P; p0 += L<W>) {
        const int64_t n = std::min(L<W>, P - p0);
        const W* sb = s + b * P + p0;
        if (rows && Cg % L<W> == 0) {
          backward_rows<RES>(maps.at((b * P + p0) * C), w, sb, dlb, u.data(), n, G, Cg);
        } else if (!rows && n == L<W>) {
          backward_columns<RES>(maps.at(b * C * P + p0), w, sb, dlv.data(), uv.data(), G, Cg, P);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t o = rows ? (b * P + p0 + i) * C : b * C * P + p0 + i;
            backward_one<RES>(maps.at(o), rows ? 1 : P, w, sb[i], dlb, u.data(), G, Cg);
          }
        }
      }
      if (!rows) {
        for (int64_t c = 0; c < C; ++c) dlb[c] += hsum<W>(dlv[c]);
      }
    }
  }
}

// ---- eq (1) for every channel: out[b, c] = mean over positions, summed in W ----

template <class T, class W>
void mean(const T* a, W* out, int64_t B, int64_t C, int64_t P, bool rows) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    W* o = out + b * C;
    std::fill(o, o + C, W(0));
    if (rows) {  // (P, C): add the rows up
      for (int64_t pos = 0; pos < P; ++pos) {
        const T* x = a + (b * P + pos) * C;
        for (int64_t c = 0; c < C; ++c) o[c] += load<W>(x + c);
      }
    } else {  // (C, P): each row's sum
      for (int64_t c = 0; c < C; ++c) {
        const T* x = a + (b * C + c) * P;
        vec<W> acc = {};
        int64_t pos = 0;
        for (; pos + L<W> <= P; pos += L<W>) acc += loadv<W>(x + pos);
        for (; pos < P; ++pos) o[c] += load<W>(x + pos);
        o[c] += hsum<W>(acc);
      }
    }
    for (int64_t c = 0; c < C; ++c) o[c] /= W(P);
  }
}


// The GAP's backward, added to the gradient already there: da[b, c, pos] += dmean[b, c] / P.
template <class T, class W>
void add_mean_grad(T* da, const W* dmean, int64_t B, int64_t C, int64_t P, bool rows) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<W> d(dmean + b * C, dmean + (b + 1) * C);
    for (W& x : d) x /= W(P);
    if (rows) {
      for (int64_t pos = 0; pos < P; ++pos) {
        T* x = da + (b * P + pos) * C;
        for (int64_t c = 0; c < C; ++c) store(x + c, load<W>(x + c) + d[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        T* x = da + (b * C + c) * P;
        for (int64_t pos = 0; pos < P; ++pos) store(x + pos, load<W>(x + pos) + d[c]);
      }
    }
  }
}

// ---- eqs (2)-(4) on the pooled vectors: the group scales 1 + M_k, the ladder weights, and
// their backward. Where the group tensors and the saved intermediates sit in the pointer arrays
// w, stats and saved is compiled in from kernels.py (LGAM_PARAM_*, LGAM_STAT_*, LGAM_SAVED_*:
// -D flags generated from its PARAMS, STATS and SAVED), as are the saved tensors' shapes, which
// kernels.py checks at the call. Per group k: s_k = GAP(x_k) + (1 + M_{k-1}) s_{k-1}, then
// M_k = sigmoid(ReLU(BN(MLP(s_k)))) with MLP = Linear(C', h) -> ReLU -> Linear(h, C'); BN on
// the batch's statistics in train mode (the running ones moved by `momentum`, the unbiased
// variance, as torch does), on the running ones in eval mode. All (B, C) unless said.
template <class W>
struct Group {  // group k's tensors
  const W *w1, *b1, *w2, *b2, *gamma, *beta;
  W *mean, *var;
  Group(W* const* w, W* const* stats, int64_t k) {
    const int64_t o = LGAM_PARAMS * k, r = LGAM_STATS * k;
    w1 = w[o + LGAM_PARAM_W1], b1 = w[o + LGAM_PARAM_B1], w2 = w[o + LGAM_PARAM_W2];
    b2 = w[o + LGAM_PARAM_B2], gamma = w[o + LGAM_PARAM_GAMMA], beta = w[o + LGAM_PARAM_BETA];
    mean = stats ? stats[r + LGAM_STAT_MEAN] : nullptr;  // the backward takes none
    var = stats ? stats[r + LGAM_STAT_VAR] : nullptr;
  }
};

template <class W>
struct Saved {  // group k's intermediates: s (B, C'), z1 (B, h), zhat (B, C'), invstd (C'), bn (B, C')
  W *s, *z1, *zhat, *invstd, *bn;
  Saved(W* const* saved, int64_t k, int64_t B, int64_t Cg, int64_t H) {
    s = saved[LGAM_SAVED_S] + k * B * Cg, z1 = saved[LGAM_SAVED_Z1] + k * B * H;
    zhat = saved[LGAM_SAVED_ZHAT] + k * B * Cg, invstd = saved[LGAM_SAVED_INVSTD] + k * Cg;
    bn = saved[LGAM_SAVED_BN] + k * B * Cg;
  }
};

template <class W>
void scales(const W* pooled, W* const* w, W* const* stats, double eps, double momentum,
            bool training, W* scale, W* p, W* q, W* v, W* const* saved, int64_t B, int64_t G,
            int64_t Cg, int64_t H) {
  const int64_t C = G * Cg;
  std::vector<W> z2(B * Cg), h(H);
  for (int64_t k = 0; k < G; ++k) {
    const Group<W> gr(w, stats, k);
    const Saved<W> sv(saved, k, B, Cg, H);
    const W* s_prev = k ? Saved<W>(saved, k - 1, B, Cg, H).s : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < Cg; ++i) {  // the GAP of the ladder's input, eq (4)
        const int64_t c = b * C + k * Cg + i;
        sv.s[b * Cg + i] = pooled[c] + (k ? scale[c - Cg] * s_prev[b * Cg + i] : W(0));
      }
      for (int64_t j = 0; j < H; ++j) {  // eq (2): Linear -> ReLU -> Linear
        sv.z1[b * H + j] = gr.b1[j] + dot(gr.w1 + j * Cg, sv.s + b * Cg, Cg);
        h[j] = std::max(sv.z1[b * H + j], W(0));
      }
      for (int64_t i = 0; i < Cg; ++i) z2[b * Cg + i] = gr.b2[i] + dot(gr.w2 + i * H, h.data(), H);
    }
    for (int64_t i = 0; i < Cg; ++i) {  // BatchNorm1d
      W mu = gr.mean[i], var = gr.var[i];
      if (training) {  // the batch's statistics; the running ones moved
        W sq = 0;
        mu = 0;
        for (int64_t b = 0; b < B; ++b) mu += z2[b * Cg + i];
        mu /= B;
        for (int64_t b = 0; b < B; ++b) sq += (z2[b * Cg + i] - mu) * (z2[b * Cg + i] - mu);
        var = sq / B;
        gr.mean[i] = (1 - W(momentum)) * gr.mean[i] + W(momentum) * mu;
        gr.var[i] = (1 - W(momentum)) * gr.var[i] + W(momentum) * sq / (B - 1);
      }
      sv.invstd[i] = 1 / std::sqrt(var + W(eps));
      for (int64_t b = 0; b < B; ++b) {
        const W zhat = (z2[b * Cg + i] - mu) * sv.invstd[i];
        sv.zhat[b * Cg + i] = zhat;
        sv.bn[b * Cg + i] = z2[b * Cg + i] = zhat * gr.gamma[i] + gr.beta[i];
      }
    }
    gate_all(z2.data(), B * Cg);  // -> ReLU -> sigmoid
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < Cg; ++i) {  // eq (3): 1 + M; P_k and 1 / P_{k-1}
        const int64_t c = b * C + k * Cg + i;
        scale[c] = 1 + z2[b * Cg + i];
        q[c] = k ? 1 / p[c - Cg] : W(1);
        p[c] = k ? p[c - Cg] * scale[c] : scale[c];
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Cg; ++i) {  // v_j = (1 / P_{j-1}) sum_{k >= j} P_k
      W tail = 0;
      for (int64_t c = b * C + C - Cg + i; c >= b * C; c -= Cg) {
        tail += p[c];
        v[c] = tail * q[c];
      }
    }
  }
}

// A Linear's weight and bias gradients, dw (n_out, n_in) and db (n_out), from its output's
// gradient dy (B, n_out) and its input x(b, i) (B, n_in).
template <class W, class Input>
void linear_grads(const W* dy, Input x, W* dw, W* db, int64_t B, int64_t n_out, int64_t n_in) {
  for (int64_t o = 0; o < n_out; ++o) {
    W d = 0;
    for (int64_t b = 0; b < B; ++b) d += dy[b * n_out + o];
    db[o] = d;
    for (int64_t i = 0; i < n_in; ++i) {
      W dw_oi = 0;
      for (int64_t b = 0; b < B; ++b) dw_oi += dy[b * n_out + o] * x(b, i);
      dw[o * n_in + i] = dw_oi;
    }
  }
}

// d_scales (B, C) -> d_pooled (B, C) and, per group, the gradients of its learned tensors
// (dw, in w's order; written, not added to). BN's backward on the batch's statistics in train
// mode; in eval mode it is the affine map it was.
template <class W>
void scales_backward(const W* d_scales, const W* scale, W* const* w, W* const* saved,
                     bool training, W* d_pooled, W* const* dw, int64_t B,
                     int64_t G, int64_t Cg, int64_t H) {
  const int64_t C = G * Cg;
  std::vector<W> ds(B * Cg, W(0)), dbn(B * Cg), dz1(B * H);
  for (int64_t k = G - 1; k >= 0; --k) {
    const Group<W> gr(w, nullptr, k);
    const int64_t o = LGAM_PARAMS * k;
    W *dw1 = dw[o + LGAM_PARAM_W1], *db1 = dw[o + LGAM_PARAM_B1], *dw2 = dw[o + LGAM_PARAM_W2];
    W *db2 = dw[o + LGAM_PARAM_B2], *dgamma = dw[o + LGAM_PARAM_GAMMA];
    W* dbeta = dw[o + LGAM_PARAM_BETA];
    const Saved<W> sv(saved, k, B, Cg, H);
    for (int64_t b = 0; b < B; ++b) {  // the scale's gradient: its own, and through s_{k+1}
      for (int64_t i = 0; i < Cg; ++i) {
        const int64_t c = b * C + k * Cg + i;
        W d = d_scales[c];
        if (k + 1 < G) d += ds[b * Cg + i] * sv.s[b * Cg + i];  // s_{k+1} = x + scale_k s_k
        const W m = scale[c] - 1;  // M = sigmoid(ReLU(bn))
        dbn[b * Cg + i] = sv.bn[b * Cg + i] <= 0 ? W(0) : d * m * (1 - m);
      }
    }
    for (int64_t i = 0; i < Cg; ++i) {  // BatchNorm1d backward
      W sum_d = 0, sum_dz = 0;
      for (int64_t b = 0; b < B; ++b) {
        sum_d += dbn[b * Cg + i];
        sum_dz += dbn[b * Cg + i] * sv.zhat[b * Cg + i];
      }
      dgamma[i] = sum_dz, dbeta[i] = sum_d;
      const W a = gr.gamma[i] * sv.invstd[i];
      for (int64_t b = 0; b < B; ++b) {  // dz2 (kept in dbn)
        const W d = dbn[b * Cg + i];
        dbn[b * Cg + i] = training ? a / B * (B * d - sum_d - sv.zhat[b * Cg + i] * sum_dz) : a * d;
      }
    }
    // the second Linear (its input ReLU(z1)), then back through it and the ReLU
    linear_grads(dbn.data(), [&](int64_t b, int64_t j) { return std::max(sv.z1[b * H + j], W(0)); },
                 dw2, db2, B, Cg, H);
    for (int64_t b = 0; b < B; ++b) {  // ReLU, the first Linear's output
      for (int64_t j = 0; j < H; ++j) {
        W d = 0;
        for (int64_t i = 0; i < Cg; ++i) d += dbn[b * Cg + i] * gr.w2[i * H + j];
        dz1[b * H + j] = sv.z1[b * H + j] <= 0 ? W(0) : d;
      }
    }
    linear_grads(dz1.data(), [&](int64_t b, int64_t i) { return sv.s[b * Cg + i]; }, dw1, db1, B, H,
                 Cg);  // the first Linear (its input s_k)
    for (int64_t b = 0; b < B; ++b) {  // s_k: the MLP's input, and the ladder's carry
      for (int64_t i = 0; i < Cg; ++i) {
        const int64_t c = b * C + k * Cg + i;
        W d = 0;
        for (int64_t j = 0; j < H; ++j) d += dz1[b * H + j] * gr.w1[j * Cg + i];
        if (k + 1 < G) d += ds[b * Cg + i] * scale[c];  // s_{k+1} = x + scale_k s_k
        ds[b * Cg + i] = d;
        d_pooled[c] = d;
      }
    }
  }
}

}  // namespace

#define LGAM_KERNELS(NAME, T, W)                                                               \
  extern "C" void lgam_mean_##NAME(const void* a, void* out, int64_t B, int64_t C, int64_t P,  \
                                   int64_t rows) {                                            \
    mean<T, W>((const T*)a, (W*)out, B, C, P, rows);                                          \
  }                                                                                           \
  extern "C" void lgam_add_mean_grad_##NAME(void* da, const void* dmean, int64_t B, int64_t C, \
                                            int64_t P, int64_t rows) {                        \
    add_mean_grad<T, W>((T*)da, (const W*)dmean, B, C, P, rows);                              \
  }                                                                                           \
  extern "C" void lgam_forward_##NAME(const void* a, const void* id, const void* p,          \
                                      const void* q, const void* v, void* out, void* s,       \
                                      int64_t B, int64_t G, int64_t Cg, int64_t P,            \
                                      int64_t rows) {                                         \
    Maps<T> m;                                                                                \
    m.x = (const T*)a, m.id = (const T*)id, m.out = (T*)out;                                  \
    (id ? forward<true, T, W> : forward<false, T, W>)(m, (const W*)p, (const W*)q,            \
                                                      (const W*)v, (W*)s, B, G, Cg, P, rows); \
  }                                                                                           \
  extern "C" void lgam_backward_##NAME(const void* a, const void* g, const void* y,           \
                                       const void* p, const void* q, const void* v,           \
                                       const void* s, void* da, void* did, void* dl,          \
                                       int64_t B, int64_t G, int64_t Cg, int64_t P,           \
                                       int64_t rows) {                                        \
    Maps<T> m;                                                                                \
    m.x = (const T*)a, m.g = (const T*)g, m.y = (const T*)y, m.out = (T*)da, m.did = (T*)did; \
    (y ? backward<true, T, W> : backward<false, T, W>)(m, (const W*)p, (const W*)q,           \
                                                       (const W*)v, (const W*)s, (W*)dl, B,   \
                                                       G, Cg, P, rows);                       \
  }


#define LGAM_SCALES(NAME, W)                                                                   \
  extern "C" void lgam_scales_##NAME(const void* pooled, void* const* w, void* const* stats,    \
                                     double eps, double momentum, int64_t training,            \
                                     void* scale, void* p, void* q, void* v,                    \
                                     void* const* saved, int64_t B, int64_t G, int64_t Cg,      \
                                     int64_t H) {                                               \
    scales<W>((const W*)pooled, (W* const*)w, (W* const*)stats, eps, momentum, training,       \
              (W*)scale, (W*)p, (W*)q, (W*)v, (W* const*)saved, B, G, Cg, H);                  \
  }                                                                                            \
  extern "C" void lgam_scales_backward_##NAME(const void* d_scales, const void* scale,         \
                                              void* const* w, void* const* saved,               \
                                              int64_t training,                                 \
                                              void* d_pooled, void* const* dw, int64_t B,       \
                                              int64_t G, int64_t Cg, int64_t H) {               \
    scales_backward<W>((const W*)d_scales, (const W*)scale, (W* const*)w, (W* const*)saved,     \
                       training, (W*)d_pooled, (W* const*)dw, B, G, Cg, H);  \
  }

LGAM_SCALES(float32, float)
LGAM_SCALES(float64, double)

LGAM_KERNELS(bfloat16, bf16, float)
LGAM_KERNELS(float32, float, float)
LGAM_KERNELS(float64, double, double)
