// The checkpoint checksum (csrc/distributed).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "../../csrc/distributed/crc32c.h"

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
