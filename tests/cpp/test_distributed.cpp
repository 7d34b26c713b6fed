// ZeRO-3 flat layout and the checkpoint checksum (csrc/distributed).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "../../csrc/distributed/crc32c.h"
#include "../../csrc/distributed/flat_layout.h"

using namespace deepseek_ext::distributed;

TEST(Crc32c, KnownAnswers) {
  const std::string digits = "123456789";
  EXPECT_EQ(crc32c(digits.data(), digits.size(), 0), 0xE3069283u);  // the standard check value
  EXPECT_EQ(crc32c("", 0, 0), 0u);
  const std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(crc32c(zeros.data(), zeros.size(), 0), 0x8A9136AAu);  // RFC 3720 B.4: 32 bytes of zeros
  const std::vector<uint8_t> ones(32, 0xFF);
  EXPECT_EQ(crc32c(ones.data(), ones.size(), 0), 0x62A8AB43u);  // RFC 3720 B.4: 32 bytes of 0xFF
}

TEST(Crc32c, ContinuesAcrossPieces) {
  std::vector<uint8_t> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 31 + 7);
  const uint32_t whole = crc32c(data.data(), data.size(), 0);
  for (size_t cut : {0ul, 1ul, 7ul, 8ul, 513ul, 1000ul}) {
    const uint32_t a = crc32c(data.data(), cut, 0);
    EXPECT_EQ(crc32c(data.data() + cut, data.size() - cut, a), whole) << cut;
  }
  data[500] ^= 1;
  EXPECT_NE(crc32c(data.data(), data.size(), 0), whole);
}

TEST(FlatLayout, PadsToAnEvenSplitAndAligns) {
  const std::vector<int64_t> numels = {10, 3, 0, 17};
  const FlatLayout l = plan_flat_layout(numels, 4, 4);
  EXPECT_EQ(l.offsets, (std::vector<int64_t>{0, 12, 16, 16}));
  EXPECT_EQ(l.used, 33);
  EXPECT_EQ(l.padded % 16, 0);
  EXPECT_GE(l.padded, 33);
  EXPECT_EQ(l.shard * 4, l.padded);
  const FlatLayout empty = plan_flat_layout({}, 3, 1);
  EXPECT_EQ(empty.padded, 3);
  EXPECT_THROW(plan_flat_layout({1}, 0, 1), std::invalid_argument);
}

TEST(FlatLayout, ShardSlicesCoverEveryParameterExactlyOnce) {
  const std::vector<int64_t> numels = {7, 1, 20, 5, 64, 3};
  for (int64_t world : {1, 2, 3, 4, 7}) {
    const FlatLayout l = plan_flat_layout(numels, world, 2);
    for (size_t p = 0; p < numels.size(); ++p) {
      std::vector<int> covered(numels[p], 0);
      for (int64_t r = 0; r < world; ++r) {
        const ShardSlice s = shard_slice(l, numels, static_cast<int64_t>(p), r);
        for (int64_t i = s.param_begin; i < s.param_end; ++i) ++covered[i];
        if (s.param_end > s.param_begin) {
          EXPECT_EQ(r * l.shard + s.shard_offset, l.offsets[p] + s.param_begin);
          EXPECT_LE(s.shard_offset + (s.param_end - s.param_begin), l.shard);
        }
      }
      for (int c : covered) EXPECT_EQ(c, 1) << "world " << world << " param " << p;
    }
  }
}

TEST(FlatLayout, Buckets) {
  EXPECT_EQ(plan_buckets({5, 5, 5, 20, 1, 1}, 10), (std::vector<int64_t>{0, 2, 3, 4}));
  EXPECT_EQ(plan_buckets({}, 10), (std::vector<int64_t>{}));
  EXPECT_EQ(plan_buckets({100}, 10), (std::vector<int64_t>{0}));
}
