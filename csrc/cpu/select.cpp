// select.cpp: kth_abs, the k-th smallest magnitude of each tensor, and
// push_kth, the same of the push of an adaptive step (Adam, Adagrad, RMSprop)
// or of its group norms, and metric_target, target_sparsity's selection and
// prox in an adaptive optimizer's metric (csrc/common/kernels_api.h for the
// contracts), on the CPU.
//
// A selection is exact: it compares values and rounds nothing, so it is
// written on the magnitudes' bit patterns. With the sign bit cleared, the bits
// of a float (any of the four formats) order as its magnitude does, and every
// NaN's bits lie above infinity's: the NaN-largest order of torch.kthvalue.
//
// Per tensor (tensors run in parallel on pyreg's pool, one tensor per item), a
// radix selection: one pass counts the keys by their top bits (11 of them, or
// fewer for a small tensor), a second copies out the keys whose top bits are
// the k-th key's (16 at a time with AVX-512 for float32) and finds the
// smallest and largest of them; the bits those two share are then known, and
// the same two steps run on the next differing bits of those few keys, until
// every bit of the k-th key is known. The last level copies nothing.
// A large tensor (2^18 keys or more) first gets a bracket around its k-th key
// from an evenly spaced sample, and one pass copies out the keys in it: the
// levels then run on those (on the whole tensor if the bracket missed).
// Every loop over the data is branch-free, and ties or
// tight clusters (the weights an optimizer step just moved off zero) end the
// selection early instead of costing extra levels. With `closest`, the count
// below the k-th key and the largest key below it come from the same passes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "sweep.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pyreg::cpu {
namespace PYREG_ISA_NS {
namespace {

constexpr int kBinBits = 11;

// The storage type's magnitude key (bits without the sign), its NaN bound
// (keys above it are NaN) and the key's value as a double.
template <typename T> struct Key;
template <> struct Key<float> {
  using K = uint32_t;
  static constexpr K kInf = 0x7f800000u;
  static K of(float v) { uint32_t u; std::memcpy(&u, &v, 4); return u & 0x7fffffffu; }
  static double value(K k) { return double(bits_f32(k)); }
};
template <> struct Key<double> {
  using K = uint64_t;
  static constexpr K kInf = 0x7ff0000000000000ull;
  static K of(double v) { uint64_t u; std::memcpy(&u, &v, 8); return u & 0x7fffffffffffffffull; }
  static double value(K k) { double d; std::memcpy(&d, &k, 8); return d; }
};
template <> struct Key<half_t> {
  using K = uint16_t;
  static constexpr K kInf = 0x7c00u;
  static K of(half_t v) { return K(v.bits & 0x7fffu); }
  static double value(K k) { return double(half_to_float(half_t{k})); }
};
template <> struct Key<bf16_t> {
  using K = uint16_t;
  static constexpr K kInf = 0x7f80u;
  static K of(bf16_t v) { return K(v.bits & 0x7fffu); }
  static double value(K k) { return double(bf16_to_float(bf16_t{k})); }
};

// hist[d] = the count of keys key(i), i < n, whose digit (key >> shift) & mask
// is d. Four interleaved counts once there are at least as many keys as bins:
// keys that share a digit (ties, and the weights an optimizer step just moved
// off zero, which differ in their last bits only) would otherwise make each
// increment of one count wait for the last. int32 counts, added into int64
// every 2^30 keys.
template <typename K, typename Get>
void count_digits(Get&& key, int64_t n, int shift, K mask, std::vector<int64_t>& hist) {
  constexpr int64_t kBlock = int64_t(1) << 30;
  const size_t bins = size_t(mask) + 1;
  const int ways = n >= int64_t(bins) ? 4 : 1;
  thread_local std::vector<int32_t> part;  // reused: a fresh one per call costs more than small counts
  if (part.size() < size_t(ways) * bins) part.resize(size_t(ways) * bins);
  int32_t* c = part.data();
  hist.assign(bins, 0);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    std::fill(c, c + size_t(ways) * bins, 0);
    int64_t i = start;
    if (ways == 4)
      for (; i + 4 <= end; i += 4)
        for (int j = 0; j < 4; ++j) ++c[size_t(j) * bins + ((key(i + j) >> shift) & mask)];
    for (; i < end; ++i) ++c[(key(i) >> shift) & mask];
    for (int j = 0; j < ways; ++j)
      for (size_t b = 0; b < bins; ++b) hist[b] += c[size_t(j) * bins + b];
  }
}

// One copy pass of a level: the keys src[i], i < m (the tensor's, as Key<T>
// reads them, or the last level's candidates), whose digit (key >> shift) &
// mask is `digit` go to `out` in order (room for m_kept + kPad keys: each
// step may write past the last kept one); returns how many. Also `best`: the
// largest key below `first` (keys below it: every key whose digit is
// smaller), and `lo`/`hi`: the smallest and largest key kept.
constexpr int64_t kPad = 16;

template <typename K>
struct Kept {
  K best, lo, hi;
};

template <typename K, typename Get>
int64_t copy_digit(Get&& key, int64_t m, int shift, K mask, K digit, K first, K* out, Kept<K>& r) {
  K best = r.best, lo = r.lo, hi = r.hi;  // locals: a store to `out` may not alias them
  int64_t kept = 0;
  for (int64_t i = 0; i < m; ++i) {
    const K v = key(i);
    out[kept] = v;  // written always; the place advances past a kept key only
    const bool keep = ((v >> shift) & mask) == digit;
    kept += int64_t(keep);
    const K low = v < first ? v : K(0);
    best = low > best ? low : best;
    lo = keep && v < lo ? v : lo;
    hi = keep && v > hi ? v : hi;
  }
  r = {best, lo, hi};
  return kept;
}

#if defined(__AVX512F__)
// (GCC 12's own AVX-512 headers trip -Wmaybe-uninitialized at -O3: their
// "undefined" vectors.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The same for 32-bit keys read straight from memory (`bits`: a float
// tensor's words, or the candidates), 16 keys a step: the kept keys
// compressed into a register and stored whole (a compress to memory is
// microcoded on some CPUs), hence kPad.
inline int64_t copy_digit32(const uint32_t* bits, int64_t m, int shift, uint32_t mask, uint32_t digit,
                            uint32_t first, uint32_t* out, Kept<uint32_t>& r) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), vmask = _mm512_set1_epi32(int(mask));
  const __m512i vdigit = _mm512_set1_epi32(int(digit)), vfirst = _mm512_set1_epi32(int(first));
  const __m128i vshift = _mm_cvtsi32_si128(shift);
  __m512i best = _mm512_set1_epi32(int(r.best)), lo = _mm512_set1_epi32(int(r.lo));
  __m512i hi = _mm512_set1_epi32(int(r.hi));
  int64_t kept = 0, i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512i v = _mm512_and_si512(_mm512_loadu_si512(bits + i), abs_mask);
    const __mmask16 keep =
        _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srl_epi32(v, vshift), vmask), vdigit);
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(keep, v));
    kept += __builtin_popcount(unsigned(keep));
    best = _mm512_mask_max_epu32(best, _mm512_cmplt_epu32_mask(v, vfirst), best, v);
    lo = _mm512_mask_min_epu32(lo, keep, lo, v);
    hi = _mm512_mask_max_epu32(hi, keep, hi, v);
  }
  Kept<uint32_t> tail{_mm512_reduce_max_epu32(best), _mm512_reduce_min_epu32(lo), _mm512_reduce_max_epu32(hi)};
  kept += copy_digit<uint32_t>([bits, i](int64_t j) { return bits[i + j] & 0x7fffffffu; }, m - i, shift, mask,
                               digit, first, out + kept, tail);
  r = tail;
  return kept;
}
#pragma GCC diagnostic pop
#endif

// ---- a large tensor: a bracket from a sample, then one pass ------------------
// From kBracketMin keys on, a selection first guesses where the k-th key lies
// from a sample of the keys (one from each run of n/s keys), as a bracket [lo, hi] of sample
// keys around the sample's own k-th, wide enough (4 standard deviations of a
// sample quantile's rank) that it almost always holds the k-th key. One pass
// then counts the keys below lo (and finds the largest of them) and copies out
// the keys in [lo, hi]; the radix levels run on those few. Where the bracket
// missed (the pass shows the k-th key outside it), the radix levels run on the
// whole tensor instead: the result is exact either way.
constexpr int64_t kBracketMin = int64_t(1) << 18;

// The sample's j-th key: one from each run of `stride` keys, at an offset
// that a fixed hash of j (splitmix64) scatters over the run, so that no
// periodic layout (rows, columns) lines up with the sample. The same keys for
// the same n, every time.
inline int64_t sample_at(int64_t j, int64_t stride) {
  uint64_t z = uint64_t(j) + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return j * stride + int64_t(z % uint64_t(stride));
}

template <typename K>
struct Bracket {
  int64_t below = 0;  // keys < lo
  K earlier = 0;      // the largest of them (0 if none)
  int64_t kept = 0;   // keys in [lo, hi], copied out
};

template <typename K, typename Get>
void bracket_pass(Get&& key, int64_t m, K lo, K hi, K* out, Bracket<K>& r) {
  K best = r.earlier;
  int64_t below = r.below, kept = r.kept;
  for (int64_t i = 0; i < m; ++i) {
    const K v = key(i);
    out[kept] = v;
    kept += int64_t(v >= lo && v <= hi);
    below += int64_t(v < lo);
    const K low = v < lo ? v : K(0);
    best = low > best ? low : best;
  }
  r.below = below;
  r.kept = kept;
  r.earlier = best;
}

#if defined(__AVX512F__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void bracket_pass32(const uint32_t* bits, int64_t m, uint32_t lo, uint32_t hi, uint32_t* out,
                           Bracket<uint32_t>& r) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i vlo = _mm512_set1_epi32(int(lo)), vhi = _mm512_set1_epi32(int(hi));
  __m512i best = _mm512_set1_epi32(int(r.earlier));
  int64_t below = r.below, kept = r.kept, i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512i v = _mm512_and_si512(_mm512_loadu_si512(bits + i), abs_mask);
    const __mmask16 lt = _mm512_cmplt_epu32_mask(v, vlo);
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(__mmask16(~lt), v, vhi);
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(in, v));
    kept += __builtin_popcount(unsigned(in));
    below += __builtin_popcount(unsigned(lt));
    best = _mm512_mask_max_epu32(best, lt, best, v);
  }
  r.below = below;
  r.kept = kept;
  r.earlier = _mm512_reduce_max_epu32(best);
  bracket_pass<uint32_t>([bits, i](int64_t j) { return bits[i + j] & 0x7fffffffu; }, m - i, lo, hi, out, r);
}
#pragma GCC diagnostic pop
#endif

// The bracket for the k-th of the n keys (n >= kBracketMin), and its pass:
// true, with the keys in the bracket in `keys` and the count and largest key
// below it in `r`, when the k-th key lies in it; false (nothing kept) if not.
template <typename T, typename K>
bool bracket(const T* x, int64_t n, int64_t k, std::unique_ptr<K[]>& keys, K& lo, K& hi, Bracket<K>& r) {
  using KT = Key<T>;
  const int64_t s = std::min<int64_t>(int64_t(1) << 15, std::max<int64_t>(int64_t(1) << 12, n >> 6));
  const int64_t stride = n / s;
  std::vector<K> sample(static_cast<size_t>(s));
  for (int64_t j = 0; j < s; ++j) sample[size_t(j)] = KT::of(x[sample_at(j, stride)]);
  const double p = double(k) / double(n);
  const double rank = p * double(s) - 0.5, margin = 4.0 * std::sqrt(double(s) * p * (1.0 - p)) + 2.0;
  const int64_t lo_rank = int64_t(std::floor(rank - margin)), hi_rank = int64_t(std::ceil(rank + margin));
  lo = K(0);
  hi = K(~K(0) >> 1);  // the largest key (the sign bit is clear)
  if (lo_rank > 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_rank, sample.end());
    lo = sample[size_t(lo_rank)];
  }
  if (hi_rank < s - 1) {
    const auto from = sample.begin() + std::max<int64_t>(lo_rank, 0);
    std::nth_element(from, sample.begin() + hi_rank, sample.end());
    hi = sample[size_t(hi_rank)];
  }
  // Room for every key (pages only touched where written: the kept ones).
  keys.reset(new K[size_t(n + kPad)]);
  r = Bracket<K>{};
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    bracket_pass32(reinterpret_cast<const uint32_t*>(x), n, lo, hi, keys.get(), r);
  } else
#endif
  {
    bracket_pass<K>([x](int64_t i) { return KT::of(x[i]); }, n, lo, hi, keys.get(), r);
  }
  if (r.below < k && k <= r.below + r.kept) return true;
  keys.reset();
  return false;
}

template <typename T>
double kth_of(const T* x, int64_t n, int64_t k, bool closest) {
  using KT = Key<T>;
  using K = typename KT::K;
  constexpr int kKeyBits = int(8 * sizeof(K)) - 1;
  std::vector<int64_t> hist;
  std::unique_ptr<K[]> keys;  // the candidates: the keys whose bits so far are the k-th key's
  int64_t n_keys = 0;
  int64_t below = 0;          // keys smaller than every candidate
  K earlier = 0;              // the largest of those (0 if none)
  K prefix = 0;               // the k-th key's bits above `shift`
  int64_t ties = 0;           // at the end: the keys equal to the k-th
  int shift = kKeyBits;
  bool in_keys = false;
  if (n >= kBracketMin) {  // a bracket from a sample first: then the levels run on the keys in it
    K lo = 0, hi = 0;
    Bracket<K> r;
    if (bracket(x, n, k, keys, lo, hi, r)) {
      in_keys = true;
      n_keys = r.kept;
      below = r.below;
      earlier = r.earlier;
      const K differ = K(lo ^ hi);  // the kept keys share the bits above their highest differing one
      shift = differ == 0 ? 0 : std::min(kKeyBits, 64 - __builtin_clzll((unsigned long long)differ));
      prefix = shift >= kKeyBits ? K(0) : K(lo & ~K((K(1) << shift) - 1));
    }
  }
  // Each level: the next digit of the k-th key, from the counts of the
  // candidates' digits; then only the keys with that digit stay candidates.
  // The copy also finds the smallest and largest key kept: every bit above
  // their highest differing bit is then known, so the next level starts
  // there (ties and tight clusters, such as the weights an optimizer step
  // just moved off zero, end in one or two levels). At the last digit nothing
  // is copied: the counts give the number of ties, and the largest key below
  // the k-th is the largest digit counted below it.
  for (;; in_keys = true) {
    const int64_t m = in_keys ? n_keys : n;
    const K* c = keys.get();
    auto key = [&](auto&& f) {
      if (in_keys) return f([c](int64_t i) { return c[i]; });
      return f([x](int64_t i) { return KT::of(x[i]); });
    };
    // Digits of up to 11 bits; for fewer than 2^15 keys, about one bin per
    // 16 keys: more bins would cost more to clear, fold and scan than they
    // save in later levels.
    const int width = 64 - __builtin_clzll(uint64_t(m) | 1);
    const int bits = std::min({kBinBits, shift, std::max(4, width - 4)});
    shift -= bits;
    const K mask = K((K(1) << bits) - 1);
    key([&](auto&& get) { count_digits<K>(get, m, shift, mask, hist); });
    int64_t d = 0;
    for (const int64_t last = int64_t(mask); d < last && below + hist[size_t(d)] < k; ++d) below += hist[size_t(d)];
    const K first = K(prefix | K(K(d) << shift));  // the smallest key with this digit
    prefix = first;
    if (shift == 0) {  // the last digit: the k-th key is known
      ties = hist[size_t(d)];
      for (int64_t b = d - 1; b >= 0; --b)
        if (hist[size_t(b)] != 0) {
          earlier = K(first - K(d - b));
          break;
        }
      break;
    }
    std::unique_ptr<K[]> next(new K[size_t(hist[size_t(d)] + kPad)]);  // (not zeroed)
    Kept<K> r{earlier, std::numeric_limits<K>::max(), K(0)};
    int64_t kept;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      const uint32_t* src = in_keys ? c : reinterpret_cast<const uint32_t*>(x);
      kept = copy_digit32(src, m, shift, mask, K(d), first, next.get(), r);
    } else
#endif
    {
      kept = key([&](auto&& get) { return copy_digit<K>(get, m, shift, mask, K(d), first, next.get(), r); });
    }
    keys = std::move(next);
    n_keys = kept;
    earlier = r.best;
    const K differ = K(r.lo ^ r.hi);  // below `shift` only: the kept keys share the digits above
    if (differ == 0) {  // every candidate is the same key
      prefix = r.lo;
      ties = kept;
      break;
    }
    // (min: each level lowers the shift, so the loop ends whatever the data)
    shift = std::min(shift, 8 * int(sizeof(unsigned long long)) - __builtin_clzll((unsigned long long)differ));
    prefix = K(r.lo & ~K((K(1) << shift) - 1));  // (shift < the key's bits: the sign bit is clear)
  }
  // Below the k-th key lie `below` keys, the largest of them `earlier`.
  const K kth = prefix;
  if (kth > KT::kInf) return std::numeric_limits<double>::quiet_NaN();
  if (!closest) return KT::value(kth);
  const int64_t n_lt = below, n_le = below + ties;
  return n_le - k > k - n_lt ? KT::value(earlier) : KT::value(kth);
}

}  // namespace

void kth_abs(const TensorList& w, const int64_t* k, bool closest, double* out, const Launch& at) {
  parallel_for(w.size(), w.size() > 1 ? threads_for(w, at.nthreads) : 1, [&](int64_t t) {
    if (k[t] == 0) {
      out[t] = 0.0;
      return;
    }
    out[t] = with_dtype(w.dtypes[t], w.ptrs[t], [&](auto* p) { return kth_of(p, w.numels[t], k[t], closest); });
  });
}

namespace {

// The push of tensor t's adaptive step (kernels_api.h's push_kth) into `out`,
// in m's type A, as csrc/common/optim_math.h computes it.
template <typename A>
void push_into(const TensorList& m, const void* const* v, const double* e, const double* s, const void* const* w,
               const double* wd, int64_t t, A* out) {
  const int64_t n = m.numels[t];
  const A* mp = static_cast<const A*>(m.ptrs[t]);
  const A* vp = v != nullptr ? static_cast<const A*>(v[t]) : nullptr;
  const A et = A(e[t]), st = A(s[t]);
  if (vp != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = adaptive_push(mp[i], vp[i], et, st);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = mp[i] / st;
  }
  if (w != nullptr) {  // a decoupled decay's term
    const A* wp = static_cast<const A*>(w[t]);
    const A wdt = A(wd[t]);
    for (int64_t i = 0; i < n; ++i) out[i] = decayed_push(out[i], wp[i], wdt);
  }
}

// The group form: the pushes in memory, their group norms (group_norms, in the
// dtype the Python op gives them: float64 if any tensor is float64, else
// float32), then the k-th smallest norm of each tensor.
void push_group_kth(const TensorList& m, const void* const* v, const double* e, const double* s,
                    const void* const* w, const double* wd, const GroupList& gl, const int64_t* k, double* out,
                    const Launch& at) {
  const int64_t n = m.size();
  bool wide = false;
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    wide = wide || m.dtypes[t] == kFloat64;
    total += gl.groups[t];
  }
  std::vector<std::unique_ptr<double[]>> bufs(static_cast<size_t>(n));  // (8-byte units: room for either type)
  TensorList pushes = m;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t words = m.dtypes[t] == kFloat64 ? m.numels[t] : (m.numels[t] + 1) / 2;
    bufs[size_t(t)].reset(new double[size_t(std::max<int64_t>(words, 1))]);
    pushes.ptrs[size_t(t)] = bufs[size_t(t)].get();
  }
  parallel_for(n, n > 1 ? threads_for(m, at.nthreads, 2) : 1, [&](int64_t t) {
    if (m.dtypes[t] == kFloat64)
      push_into(m, v, e, s, w, wd, t, static_cast<double*>(pushes.ptrs[size_t(t)]));
    else
      push_into(m, v, e, s, w, wd, t, static_cast<float*>(pushes.ptrs[size_t(t)]));
  });
  std::unique_ptr<double[]> norms(new double[size_t(std::max<int64_t>(total, 1))]);
  group_norms(pushes, gl, norms.get(), wide ? kFloat64 : kFloat32, at);
  std::vector<int64_t> first(size_t(n) + 1, 0);
  for (int64_t t = 0; t < n; ++t) first[size_t(t) + 1] = first[size_t(t)] + gl.groups[t];
  parallel_for(n, 1, [&](int64_t t) {
    const int64_t g = gl.groups[t];
    if (k[t] == 0) {
      out[t] = 0.0;
    } else if (wide) {
      out[t] = kth_of(norms.get() + first[size_t(t)], g, k[t], false);
    } else {
      out[t] = kth_of(reinterpret_cast<const float*>(norms.get()) + first[size_t(t)], g, k[t], false);
    }
  });
}

}  // namespace

void push_kth(const TensorList& m, const void* const* v, const double* e, const double* s, const void* const* w,
              const double* wd, const GroupList* groups, const int64_t* k, double* out, const Launch& at) {
  if (groups != nullptr) {
    push_group_kth(m, v, e, s, w, wd, *groups, k, out, at);
    return;
  }
  parallel_for(m.size(), m.size() > 1 ? threads_for(m, at.nthreads, 2) : 1, [&](int64_t t) {
    const int64_t n = m.numels[t];
    if (k[t] == 0) {
      out[t] = 0.0;
      return;
    }
    auto run = [&](auto* zero) {
      using A = std::remove_pointer_t<decltype(zero)>;
      std::unique_ptr<A[]> push(new A[size_t(n)]);
      push_into(m, v, e, s, w, wd, t, push.get());
      return kth_of(static_cast<const A*>(push.get()), n, k[t], false);
    };
    out[t] = m.dtypes[t] == kFloat64 ? run(static_cast<double*>(nullptr)) : run(static_cast<float*>(nullptr));
  });
}

void metric_target(const TensorList& w, const void* const* v, const double* e, const double* s, const int64_t* k,
                   bool closest, const double* m, const double* l2, double* l1, const Launch& at) {
  parallel_for(w.size(), w.size() > 1 ? threads_for(w, at.nthreads, 2) : 1, [&](int64_t t) {
    const int64_t n = w.numels[t];
    auto run = [&](auto* zero) {
      using A = std::remove_pointer_t<decltype(zero)>;
      A* wp = static_cast<A*>(w.ptrs[size_t(t)]);
      const A* vp = static_cast<const A*>(v[t]);
      const A et = A(e[t]), st = A(s[t]);
      const bool floor = !(e[t] > 0.0);
      std::unique_ptr<A[]> u(new A[size_t(std::max<int64_t>(n, 1))]);
      for (int64_t i = 0; i < n; ++i) u[size_t(i)] = wp[i] * metric_divisor(vp[i], et, st, floor);
      const double tau = k[t] == 0 ? 0.0 : kth_of(static_cast<const A*>(u.get()), n, k[t], closest);
      l1[t] = per_lr(tau, m[t]);
      const A tt = A(tau), add = A(2.0 * m[t] * l2[t]);
      for (int64_t i = 0; i < n; ++i)
        wp[i] = metric_target_value(u[size_t(i)], tt, metric_divisor(vp[i], et, st, floor) + add);
    };
    if (w.dtypes[t] == kFloat64) run(static_cast<double*>(nullptr));
    else run(static_cast<float*>(nullptr));
  });
}

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
