// The DynamicSampler core (csrc/data/sampler_core.*) and the Philox generator it draws from.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <stdexcept>
#include <vector>

#include "../../csrc/data/sampler_core.h"
#include "deepseek_ext/philox.h"

using deepseek_ext::data::AliasTable;
using deepseek_ext::data::ClassSampler;
using deepseek_ext::data::FeistelPermutation;
using deepseek_ext::rng::philox4x32_10;

namespace {

// Known-answer vectors of the Random123 reference implementation (kat_vectors, philox4x32 10 rounds).
TEST(Philox, KnownAnswers) {
  auto zero = philox4x32_10(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(zero.v[0], 0x6627e8d5u);
  EXPECT_EQ(zero.v[1], 0xe169c58du);
  EXPECT_EQ(zero.v[2], 0xbc57ac4cu);
  EXPECT_EQ(zero.v[3], 0x9b00dbd8u);
  auto ones = philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  EXPECT_EQ(ones.v[0], 0x408f276du);
  EXPECT_EQ(ones.v[1], 0x41c83b0eu);
  EXPECT_EQ(ones.v[2], 0xa20bc7c6u);
  EXPECT_EQ(ones.v[3], 0x6d5451fdu);
  auto pi = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(pi.v[0], 0xd16cfe09u);
  EXPECT_EQ(pi.v[1], 0x94fdccebu);
  EXPECT_EQ(pi.v[2], 0x5001e420u);
  EXPECT_EQ(pi.v[3], 0x24126ea1u);
}

TEST(AliasTable, ProbabilitiesEqualNormalisedWeights) {
  const std::vector<std::vector<double>> cases = {
      {1.0}, {0.3, 0.7}, {0.0, 1.0, 0.0}, {5, 1, 1, 1, 0, 2}, {1e-9, 1.0}, std::vector<double>(1000, 0.5)};
  for (const auto& w : cases) {
    AliasTable t(w);
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    const auto p = t.probabilities();
    for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(p[i], w[i] / total, 1e-9) << "entry " << i;
  }
}

TEST(AliasTable, ZeroWeightIsNeverDrawn) {
  AliasTable t({0.0, 3.0, 0.0, 1.0});
  for (uint32_t a = 0; a < 4096; ++a) {
    const int64_t c = t.sample(a * 1048573u, a * 2654435761u);
    EXPECT_TRUE(c == 1 || c == 3);
  }
}

TEST(AliasTable, RejectsBadWeights) {
  EXPECT_THROW(AliasTable({-1.0, 2.0}), std::invalid_argument);
  EXPECT_THROW(AliasTable({0.0, 0.0}), std::invalid_argument);
  EXPECT_THROW(AliasTable({NAN, 1.0}), std::invalid_argument);
}

TEST(FeistelPermutation, IsABijection) {
  for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 17ull, 64ull, 1000ull, 4097ull}) {
    FeistelPermutation p(n, 12345);
    std::vector<char> seen(n, 0);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t v = p(i);
      ASSERT_LT(v, n);
      ASSERT_FALSE(seen[v]) << "n=" << n << " repeats " << v;
      seen[v] = 1;
    }
  }
  // Different keys give different orders.
  FeistelPermutation a(1000, 1), b(1000, 2);
  int same = 0;
  for (uint64_t i = 0; i < 1000; ++i) same += a(i) == b(i);
  EXPECT_LT(same, 20);
}

std::vector<int64_t> labels_with_counts(const std::vector<int64_t>& counts) {
  std::vector<int64_t> labels;
  for (size_t c = 0; c < counts.size(); ++c) labels.insert(labels.end(), counts[c], static_cast<int64_t>(c));
  // Interleave deterministically so classes are not contiguous in the dataset.
  std::vector<int64_t> out(labels.size());
  for (size_t i = 0; i < labels.size(); ++i) out[(i * 7919) % labels.size()] = labels[i];
  return out;
}

TEST(ClassSampler, FrequenciesFollowTheWeights) {
  const auto labels = labels_with_counts({9900, 100});
  ClassSampler s(labels.data(), labels.size(), 2, 7, 1, 0);
  s.set_weights({0.3, 0.7});
  const int64_t n = 200000;
  std::vector<int64_t> out(n);
  s.draw(n, true, out.data());
  int64_t rare = 0;
  for (int64_t i : out) rare += labels[i] == 1;
  const double p = static_cast<double>(rare) / n;
  EXPECT_NEAR(p, 0.7, 5 * std::sqrt(0.7 * 0.3 / n));  // five standard errors
  EXPECT_EQ(s.drawn()[1], rare);
}

TEST(ClassSampler, WithoutReplacementNoRepeatUntilTheClassIsExhausted) {
  const auto labels = labels_with_counts({500, 37});
  ClassSampler s(labels.data(), labels.size(), 2, 3, 1, 0);
  s.set_weights({0.5, 0.5});
  std::vector<int64_t> out(400);
  s.draw(400, false, out.data());
  std::set<int64_t> first_pass_rare, common;
  int64_t rare_seen = 0;
  for (int64_t i : out) {
    if (labels[i] == 1) {
      if (rare_seen++ < 37) {
        EXPECT_TRUE(first_pass_rare.insert(i).second) << "rare item repeated before its class ran out";
      }
    } else {
      EXPECT_TRUE(common.insert(i).second) << "common item repeated";
    }
  }
  EXPECT_GT(rare_seen, 37);  // the rare class ran out and started a new pass
  EXPECT_EQ(first_pass_rare.size(), 37u);
}

TEST(ClassSampler, RanksAreDisjointAndDeterministic) {
  const auto labels = labels_with_counts({3000, 1000, 20});
  std::vector<std::set<int64_t>> seen(4);
  for (int64_t rank = 0; rank < 4; ++rank) {
    ClassSampler a(labels.data(), labels.size(), 3, 11, 4, rank);
    ClassSampler b(labels.data(), labels.size(), 3, 11, 4, rank);
    a.set_weights({0.5, 0.5, 0.0});
    b.set_weights({0.5, 0.5, 0.0});
    std::vector<int64_t> x(400), y(400);
    a.draw(400, false, x.data());
    b.draw(400, false, y.data());
    EXPECT_EQ(x, y);
    seen[rank].insert(x.begin(), x.end());
    EXPECT_EQ(seen[rank].size(), 400u);  // the shares (750 and 250 items) are not exhausted yet
    // Past exhaustion items repeat, but still only from this rank's share.
    std::vector<int64_t> more(1200);
    a.draw(1200, false, more.data());
    seen[rank].insert(more.begin(), more.end());
  }
  for (int a = 0; a < 4; ++a) {
    for (int b = a + 1; b < 4; ++b) {
      for (int64_t i : seen[a]) EXPECT_EQ(seen[b].count(i), 0u) << "ranks " << a << " and " << b << " share " << i;
    }
  }
}

TEST(ClassSampler, StateRestoresTheExactContinuation) {
  const auto labels = labels_with_counts({700, 300});
  ClassSampler a(labels.data(), labels.size(), 2, 5, 1, 0);
  a.set_weights({0.4, 0.6});
  std::vector<int64_t> warm(333);
  a.draw(333, false, warm.data());
  const auto st = a.state();
  std::vector<int64_t> expect(1000);
  a.draw(1000, false, expect.data());

  ClassSampler b(labels.data(), labels.size(), 2, 5, 1, 0);
  b.set_weights({0.4, 0.6});
  b.load_state(st);
  std::vector<int64_t> got(1000);
  b.draw(1000, false, got.data());
  EXPECT_EQ(got, expect);
}

TEST(ClassSampler, EpochsReshuffle) {
  const auto labels = labels_with_counts({100, 100});
  ClassSampler s(labels.data(), labels.size(), 2, 5, 1, 0);
  std::vector<int64_t> e0(50), e1(50);
  s.set_epoch(0);
  s.draw(50, false, e0.data());
  s.set_epoch(1);
  s.draw(50, false, e1.data());
  EXPECT_NE(e0, e1);
}

TEST(ClassSampler, RejectsInconsistentInput) {
  const std::vector<int64_t> labels = {0, 0, 1, 5};
  EXPECT_THROW(ClassSampler(labels.data(), 4, 2, 0, 1, 0), std::invalid_argument);  // label 5 out of range
  const std::vector<int64_t> ok = {0, 0, 2};
  ClassSampler s(ok.data(), 3, 3, 0, 1, 0);
  EXPECT_THROW(s.set_weights({0.5, 0.5, 0.0}), std::invalid_argument);  // class 1 has no items
  EXPECT_THROW(s.set_weights({1.0}), std::invalid_argument);
  EXPECT_THROW(ClassSampler(ok.data(), 3, 3, 0, 2, 2), std::invalid_argument);  // rank out of range
}

}  // namespace
