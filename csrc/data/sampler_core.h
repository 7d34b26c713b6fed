// The C++ core of deepseek_ext.data.DynamicSampler: class-conditional index sampling with O(1) work per draw.
//
// Items are grouped by class once (a counting sort: one int64 per item). A draw picks a class from an alias table
// over the current class weights, then an item of that class:
//   - with replacement: a uniform item of the class;
//   - without replacement: the next item of a per-(epoch, class) pseudo-random permutation (a Feistel network,
//     so no shuffled copy is stored); when a class runs out, its next pass walks it again in a fresh order.
// Randomness is Philox keyed by the seed, with (rank, epoch) as stream and the draw number as counter, so a stream
// is a pure function of (seed, rank, epoch, draw number, class weights): reproducible, resumable from a few
// counters, and split across ranks.
// Distributed: rank r of R only ever takes positions p with p % R == r of each class's order, so ranks are
// disjoint (also across passes); a class with fewer items than ranks is shared by all ranks instead.
//
// Standalone C++ (no torch), tested with GoogleTest in tests/cpp/test_sampler_core.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace deepseek_ext {
namespace data {

// Walker/Vose alias table over non-negative weights: O(C) to build, O(1) per draw from 64 random bits.
class AliasTable {
 public:
  AliasTable() = default;
  explicit AliasTable(const std::vector<double>& weights);
  int64_t sample(uint32_t column_bits, uint32_t coin_bits) const;
  int64_t size() const { return static_cast<int64_t>(alias_.size()); }
  // The probability each entry is drawn with (for tests).
  std::vector<double> probabilities() const;

 private:
  std::vector<uint64_t> threshold_;  // keep column i when coin < threshold_[i] (scaled by 2^32)
  std::vector<int64_t> alias_;
};

// A keyed pseudo-random bijection of [0, n): a 4-round Feistel network on the next even number of bits, with
// cycle walking back into range (fewer than 4 steps on average).
class FeistelPermutation {
 public:
  FeistelPermutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;

 private:
  static constexpr int kRounds = 4;
  uint64_t n_;
  int half_bits_;
  uint64_t half_mask_;
  uint64_t round_key_[kRounds];
};

class ClassSampler {
 public:
  // labels[i] in [0, num_classes); negative labels mark items that are never drawn.
  ClassSampler(const int64_t* labels, int64_t n, int64_t num_classes, uint64_t seed, int64_t num_replicas,
               int64_t rank);

  int64_t num_classes() const { return static_cast<int64_t>(class_size_.size()); }
  const std::vector<int64_t>& class_sizes() const { return class_size_; }

  // New class weights (not necessarily normalised); classes with weight > 0 must have items.
  void set_weights(const std::vector<double>& weights);
  const std::vector<double>& weights() const { return weights_; }

  // Starts epoch `epoch`: permutations change and every class's without-replacement pass restarts.
  void set_epoch(int64_t epoch);
  int64_t epoch() const { return epoch_; }

  // Writes `count` dataset indices to out.
  void draw(int64_t count, bool replacement, int64_t* out);

  // How many items of each class this sampler has drawn since construction (feeds the mix correction).
  const std::vector<int64_t>& drawn() const { return drawn_; }

  // Everything needed to continue the exact stream: epoch, draw counter, per-class cursors and counts.
  std::vector<int64_t> state() const;
  void load_state(const std::vector<int64_t>& state);

  // Bytes held per dataset item (the grouped index).
  static constexpr int64_t kBytesPerItem = sizeof(int64_t);

 private:
  // Index into grouped_ for a draw of class cls: value is 64 random bits (with replacement) or the draw's number
  // within its class this epoch (without replacement).
  int64_t position(int64_t cls, bool replacement, uint64_t value) const;
  int64_t share_of(int64_t cls) const;
  uint64_t perm_key(int64_t cls) const;
  void reset_permutations();  // the epoch's permutation of each class

  static constexpr int64_t kParallelDraws = 4096;

  uint64_t seed_;
  int64_t replicas_;
  int64_t rank_;
  std::vector<int64_t> grouped_;      // dataset indices sorted by class (stable)
  std::vector<int64_t> class_start_;  // offset of each class in grouped_
  std::vector<int64_t> class_size_;
  std::vector<double> weights_;
  AliasTable table_;
  int64_t epoch_ = 0;
  uint64_t counter_ = 0;         // draws so far in this epoch (the Philox counter)
  std::vector<int64_t> cursor_;  // without-replacement draws per class in this epoch
  std::vector<int64_t> share_;   // items of each class this rank may take
  std::vector<int64_t> classes_;  // scratch: the class of each draw of the current call
  std::vector<int64_t> drawn_;
  // Per class, the epoch's order (which fixes each rank's share and the order of the first pass).
  std::vector<FeistelPermutation> epoch_perm_;
};

}  // namespace data
}  // namespace deepseek_ext
