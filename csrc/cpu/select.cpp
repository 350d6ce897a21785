// select.cpp: kth_abs, the k-th smallest magnitude of each tensor
// (csrc/common/kernels_api.h for the contract), on the CPU.
//
// A selection is exact: it compares values and rounds nothing, so it is
// written on the magnitudes' bit patterns. With the sign bit cleared, the bits
// of a float (any of the four formats) order as its magnitude does, and every
// NaN's bits lie above infinity's: the NaN-largest order of torch.kthvalue.
//
// Per tensor (tensors run in parallel on pyreg's pool, one tensor per item), a
// radix selection: one pass counts the keys by their top bits (11 of them, or
// fewer for a small tensor), a second copies out the keys whose top bits are
// the k-th key's; the same two steps on the next bits of those few keys, and
// so on until every bit of the k-th key is known (3 levels for a large
// 32-bit float tensor).
// No comparison sorts: every loop is branch-free over the data, so the time
// does not depend on the values (ties included). With `closest`, the count
// below the k-th key and the largest key below it come from the same passes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "sweep.h"

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
// is d. Four interleaved counts for a long run (neighbouring weights often
// share a digit, and one count would make each increment wait for the last);
// int32 counts, added into int64 every 2^30 keys.
template <typename K, typename Get>
void count_digits(Get&& key, int64_t n, int shift, K mask, std::vector<int64_t>& hist) {
  constexpr int64_t kBlock = int64_t(1) << 30;
  const size_t bins = size_t(mask) + 1;
  const int ways = n >= 16384 ? 4 : 1;
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

template <typename T>
double kth_of(const T* x, int64_t n, int64_t k, bool closest) {
  using KT = Key<T>;
  using K = typename KT::K;
  constexpr int kKeyBits = int(8 * sizeof(K)) - 1;
  std::vector<int64_t> hist;
  std::vector<K> keys;  // the candidates: the keys whose digits so far are the k-th key's
  int64_t below = 0;    // keys smaller than every candidate
  K earlier = 0;        // the largest of those (0 if none)
  K prefix = 0;         // the k-th key's digits so far
  int shift = kKeyBits;
  // One level: the digit below `shift` of the k-th key, from the counts of
  // the candidates' digits (key(i), i < m: the tensor's, or `keys` when
  // in_keys); then only the keys with that digit stay candidates, written to
  // `keys` without a branch (each key is written at the next free place,
  // which advances only past a key that stays).
  auto level = [&](auto&& key, int64_t m, bool in_keys) {
    // Digits of up to 11 bits; fewer for few keys, whose counts would
    // otherwise cost more to set up and scan than the keys themselves.
    const int width = 64 - __builtin_clzll(uint64_t(m) | 1);
    const int bits = std::min({kBinBits, shift, std::max(4, width)});
    shift -= bits;
    const K mask = K((K(1) << bits) - 1);
    count_digits<K>(key, m, shift, mask, hist);
    int64_t d = 0;
    for (; below + hist[size_t(d)] < k; ++d) below += hist[size_t(d)];
    const K first = K(prefix | K(K(d) << shift));  // the smallest key with this digit
    prefix = first;
    if (in_keys && hist[size_t(d)] == m) return;  // every candidate has the digit: they all stay
    std::vector<K> next(size_t(hist[size_t(d)]) + 1);
    size_t kept = 0;
    for (int64_t i = 0; i < m; ++i) {
      const K v = key(i);
      next[kept] = v;
      kept += size_t(((v >> shift) & mask) == K(d));
      const K low = v < first ? v : K(0);
      earlier = low > earlier ? low : earlier;
    }
    next.resize(kept);
    keys.swap(next);
  };
  level([x](int64_t i) { return KT::of(x[i]); }, n, false);
  while (shift > 0) {
    const K* c = keys.data();
    level([c](int64_t i) { return c[i]; }, int64_t(keys.size()), true);
  }
  // Every candidate is now the k-th key; below it lie `below` keys, the
  // largest of them `earlier`.
  const K kth = prefix;
  if (kth > KT::kInf) return std::numeric_limits<double>::quiet_NaN();
  if (!closest) return KT::value(kth);
  const int64_t n_lt = below, n_le = below + int64_t(keys.size());
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

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
