#include "sampler_core.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "deepseek_ext/philox.h"

namespace deepseek_ext {
namespace data {
namespace {

// Stream ids for Philox: one per purpose, so class draws and permutation keys never share random numbers.
constexpr uint64_t kDrawStream = 0x5d5a000000000000ull;

uint64_t mix64(uint64_t x) {  // SplitMix64 finaliser
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("DynamicSampler: " + msg); }

}  // namespace

AliasTable::AliasTable(const std::vector<double>& weights) {
  const size_t c = weights.size();
  double total = 0.0;
  for (double w : weights) {
    if (!(w >= 0.0) || !std::isfinite(w)) fail("class weights must be finite and non-negative");
    total += w;
  }
  if (c == 0 || total <= 0.0) fail("at least one class needs a positive weight");

  // Vose's method: scale so the mean is 1, pair each under-full column with an over-full one.
  std::vector<double> scaled(c);
  std::vector<int64_t> small, large;
  for (size_t i = 0; i < c; ++i) {
    scaled[i] = weights[i] * static_cast<double>(c) / total;
    (scaled[i] < 1.0 ? small : large).push_back(static_cast<int64_t>(i));
  }
  threshold_.assign(c, 0);
  alias_.resize(c);
  for (size_t i = 0; i < c; ++i) alias_[i] = static_cast<int64_t>(i);
  constexpr double kOne = 4294967296.0;  // 2^32
  while (!small.empty() && !large.empty()) {
    const int64_t s = small.back();
    small.pop_back();
    const int64_t l = large.back();
    threshold_[s] = static_cast<uint64_t>(scaled[s] * kOne);
    alias_[s] = l;
    scaled[l] -= 1.0 - scaled[s];
    if (scaled[l] < 1.0) {
      large.pop_back();
      small.push_back(l);
    }
  }
  // Leftovers are full columns up to rounding. A leftover "small" column with zero weight must never be kept.
  for (int64_t l : large) threshold_[l] = static_cast<uint64_t>(kOne);
  for (int64_t s : small) {
    threshold_[s] = weights[s] > 0.0 ? static_cast<uint64_t>(kOne) : 0;
    if (weights[s] <= 0.0) {
      // Point it at any positive-weight class; its column then always redirects there.
      alias_[s] = std::max_element(weights.begin(), weights.end()) - weights.begin();
    }
  }
}

int64_t AliasTable::sample(uint32_t column_bits, uint32_t coin_bits) const {
  const auto col = static_cast<int64_t>((static_cast<uint64_t>(column_bits) * alias_.size()) >> 32);
  return coin_bits < threshold_[col] ? col : alias_[col];
}

std::vector<double> AliasTable::probabilities() const {
  const double c = static_cast<double>(alias_.size());
  std::vector<double> p(alias_.size(), 0.0);
  for (size_t i = 0; i < alias_.size(); ++i) {
    const double keep = static_cast<double>(threshold_[i]) / 4294967296.0;
    p[i] += keep / c;
    p[alias_[i]] += (1.0 - keep) / c;
  }
  return p;
}

FeistelPermutation::FeistelPermutation(uint64_t n, uint64_t key) : n_(n) {
  // Smallest even bit count whose power of two covers n (at least 2).
  int bits = n <= 4 ? 2 : 64 - __builtin_clzll(n - 1);
  bits += bits & 1;
  half_bits_ = bits / 2;
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
  for (int r = 0; r < kRounds; ++r) round_key_[r] = mix64(key + static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull);
}

uint64_t FeistelPermutation::operator()(uint64_t i) const {
  if (n_ <= 1) return 0;
  const int shift = 64 - half_bits_;
  uint64_t x = i;
  do {  // cycle walking: a bijection of the power-of-4 domain, re-applied until the value lands in [0, n)
    uint64_t left = x >> half_bits_;
    uint64_t right = x & half_mask_;
    for (int r = 0; r < kRounds; ++r) {
      // Round function: the top bits of a keyed multiply (one multiply, good avalanche in the high bits).
      const uint64_t f = ((right ^ round_key_[r]) * 0xD6E8FEB86659FD93ull) >> shift;
      const uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half_bits_) | right;
  } while (x >= n_);
  return x;
}

ClassSampler::ClassSampler(const int64_t* labels, int64_t n, int64_t num_classes, uint64_t seed,
                           int64_t num_replicas, int64_t rank)
    : seed_(seed), replicas_(num_replicas), rank_(rank) {
  if (num_classes < 1) fail("need at least one class");
  if (num_replicas < 1 || rank < 0 || rank >= num_replicas) {
    fail("rank must be in [0, num_replicas), got rank " + std::to_string(rank) + " of " +
         std::to_string(num_replicas));
  }
  class_size_.assign(num_classes, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = labels[i];
    if (c >= num_classes) fail("label " + std::to_string(c) + " at index " + std::to_string(i) + " is out of range");
    if (c >= 0) ++class_size_[c];
  }
  class_start_.assign(num_classes, 0);
  for (int64_t c = 1; c < num_classes; ++c) class_start_[c] = class_start_[c - 1] + class_size_[c - 1];
  grouped_.resize(num_classes ? class_start_.back() + class_size_.back() : 0);
  std::vector<int64_t> fill = class_start_;
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] >= 0) grouped_[fill[labels[i]]++] = i;
  }
  cursor_.assign(num_classes, 0);
  drawn_.assign(num_classes, 0);
  epoch_perm_.assign(num_classes, FeistelPermutation(1, 0));
  share_.resize(num_classes);
  for (int64_t c = 0; c < num_classes; ++c) share_[c] = share_of(c);
  reset_permutations();
  std::vector<double> natural(class_size_.begin(), class_size_.end());
  set_weights(natural);
}

void ClassSampler::set_weights(const std::vector<double>& weights) {
  if (static_cast<int64_t>(weights.size()) != num_classes()) {
    fail("expected " + std::to_string(num_classes()) + " class weights, got " + std::to_string(weights.size()));
  }
  for (int64_t c = 0; c < num_classes(); ++c) {
    if (weights[c] > 0.0 && class_size_[c] == 0) {
      fail("class " + std::to_string(c) + " has a positive weight but no items");
    }
  }
  table_ = AliasTable(weights);
  weights_ = weights;
}

int64_t ClassSampler::share_of(int64_t cls) const {
  const int64_t size = class_size_[cls];
  return size < replicas_ ? size : (size - rank_ + replicas_ - 1) / replicas_;
}

void ClassSampler::set_epoch(int64_t epoch) {
  epoch_ = epoch;
  counter_ = 0;
  std::fill(cursor_.begin(), cursor_.end(), 0);
  reset_permutations();
}

int64_t ClassSampler::position(int64_t cls, bool replacement, uint64_t value) const {
  // This rank's share of the class: positions rank, rank + R, ... (or all of it if the class is tiny).
  const bool shared = class_size_[cls] < replicas_;
  const uint64_t stride = shared ? 1 : static_cast<uint64_t>(replicas_);
  const uint64_t offset = shared ? 0 : static_cast<uint64_t>(rank_);
  const auto share = static_cast<uint64_t>(share_[cls]);
  if (replacement) {  // value: 64 random bits
    return class_start_[cls] + static_cast<int64_t>(offset + stride * rng::uniform_below(value, share));
  }
  // Without replacement (value: the class's draw number in this epoch): the epoch's permutation of the class fixes
  // each rank's share and the first pass's order; later passes walk the share again in a fresh order, so a rank
  // never takes another rank's items.
  uint64_t in_share = value;
  if (value >= share) {  // a later pass (the division is skipped on the common first pass)
    const uint64_t pass = value / share;
    in_share = value % share;
    in_share = FeistelPermutation(share, mix64(perm_key(cls) + static_cast<uint64_t>(rank_) * 0xD6E8FEB86659FD93ull +
                                               pass))(in_share);
  }
  return class_start_[cls] + static_cast<int64_t>(epoch_perm_[cls](offset + stride * in_share));
}

uint64_t ClassSampler::perm_key(int64_t cls) const {
  return mix64(seed_ ^ mix64(static_cast<uint64_t>(epoch_) * 0x100000001B3ull +
                             static_cast<uint64_t>(cls) * 0x9E3779B97F4A7C15ull));
}

void ClassSampler::reset_permutations() {
  for (int64_t c = 0; c < num_classes(); ++c) {
    epoch_perm_[c] = FeistelPermutation(static_cast<uint64_t>(class_size_[c]), perm_key(c));
  }
}

void ClassSampler::draw(int64_t count, bool replacement, int64_t* out) {
  // The stream is (rank, epoch) and the counter the draw number within the epoch: an epoch's randomness is the
  // same whenever it is replayed (set_epoch), and independent across ranks and epochs.
  const uint64_t stream = mix64(kDrawStream + static_cast<uint64_t>(rank_)) ^ static_cast<uint64_t>(epoch_);
  const uint64_t base = counter_;
  classes_.resize(static_cast<size_t>(count));
  int64_t* cls = classes_.data();
  // 1. Classes and random bits: independent per draw, so parallel (OpenMP, where the build enables it).
#pragma omp parallel for schedule(static) if (count >= kParallelDraws)
  for (int64_t i = 0; i < count; ++i) {
    const rng::Philox4x32Out r = rng::philox(seed_, stream, base + static_cast<uint64_t>(i));
    cls[i] = table_.sample(r.v[0], r.v[1]);
    out[i] = static_cast<int64_t>((static_cast<uint64_t>(r.v[2]) << 32) | r.v[3]);
  }
  counter_ += static_cast<uint64_t>(count);
  // 2. Counts, and each draw's number within its class (sequential, a few cycles per draw).
  for (int64_t i = 0; i < count; ++i) {
    ++drawn_[cls[i]];
    if (!replacement) out[i] = cursor_[cls[i]]++;
  }
  // 3. Positions and the gather from the grouped index (independent again; the cache misses overlap).
#pragma omp parallel for schedule(static) if (count >= kParallelDraws)
  for (int64_t i = 0; i < count; ++i) {
    out[i] = grouped_[position(cls[i], replacement, static_cast<uint64_t>(out[i]))];
  }
}

std::vector<int64_t> ClassSampler::state() const {
  std::vector<int64_t> s{epoch_, static_cast<int64_t>(counter_), num_classes()};
  s.insert(s.end(), cursor_.begin(), cursor_.end());
  s.insert(s.end(), drawn_.begin(), drawn_.end());
  return s;
}

void ClassSampler::load_state(const std::vector<int64_t>& s) {
  const int64_t c = num_classes();
  if (static_cast<int64_t>(s.size()) != 3 + 2 * c || s[2] != c) {
    fail("state does not belong to a sampler with " + std::to_string(c) + " classes");
  }
  epoch_ = s[0];
  counter_ = static_cast<uint64_t>(s[1]);
  std::copy(s.begin() + 3, s.begin() + 3 + c, cursor_.begin());
  std::copy(s.begin() + 3 + c, s.end(), drawn_.begin());
  reset_permutations();
}

}  // namespace data
}  // namespace deepseek_ext
