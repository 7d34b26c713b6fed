#include "flat_layout.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace deepseek_ext {
namespace distributed {

FlatLayout plan_flat_layout(const std::vector<int64_t>& numels, int64_t world_size, int64_t align) {
  if (world_size < 1) throw std::invalid_argument("plan_flat_layout: world_size must be >= 1");
  if (align < 1) throw std::invalid_argument("plan_flat_layout: align must be >= 1");
  FlatLayout l;
  int64_t pos = 0;
  for (int64_t n : numels) {
    if (n < 0) throw std::invalid_argument("plan_flat_layout: negative parameter size " + std::to_string(n));
    pos = (pos + align - 1) / align * align;
    l.offsets.push_back(pos);
    pos += n;
  }
  l.used = pos;
  const int64_t unit = world_size * align;  // each shard starts aligned too
  l.padded = std::max<int64_t>(unit, (pos + unit - 1) / unit * unit);
  l.shard = l.padded / world_size;
  return l;
}

ShardSlice shard_slice(const FlatLayout& layout, const std::vector<int64_t>& numels, int64_t param, int64_t rank) {
  const int64_t p0 = layout.offsets.at(static_cast<size_t>(param));
  const int64_t p1 = p0 + numels.at(static_cast<size_t>(param));
  const int64_t s0 = rank * layout.shard, s1 = s0 + layout.shard;
  const int64_t b = std::max(p0, s0), e = std::min(p1, s1);
  if (b >= e) return {};
  return {b - p0, e - p0, b - s0};
}

std::vector<int64_t> plan_buckets(const std::vector<int64_t>& unit_elems, int64_t bucket_elems) {
  std::vector<int64_t> starts;
  int64_t filled = 0;
  for (size_t i = 0; i < unit_elems.size(); ++i) {
    if (starts.empty() || filled + unit_elems[i] > bucket_elems) {
      starts.push_back(static_cast<int64_t>(i));
      filled = 0;
    }
    filled += unit_elems[i];
  }
  return starts;
}

}  // namespace distributed
}  // namespace deepseek_ext
