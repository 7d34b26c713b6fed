// Flat-buffer layout for ZeRO-3 sharding (deepseek_ext/distributed): where each parameter of a sharding unit sits in
// the unit's flat buffer, how the buffer is padded so it splits evenly over the ranks, which slice each rank owns,
// and how units are grouped into communication buckets. Plain C++ (no torch), tested with GoogleTest.
#pragma once

#include <cstdint>
#include <vector>

namespace deepseek_ext {
namespace distributed {

struct FlatLayout {
  std::vector<int64_t> offsets;  // start of each parameter in the flat buffer (elements)
  int64_t used = 0;              // elements holding parameters (including alignment gaps)
  int64_t padded = 0;            // total size: a multiple of world_size (and of align)
  int64_t shard = 0;             // padded / world_size: elements each rank owns
};

// Parameters of numels[i] elements laid out in order, each start aligned to `align` elements.
FlatLayout plan_flat_layout(const std::vector<int64_t>& numels, int64_t world_size, int64_t align);

// The part of parameter i that rank r owns: [begin, end) in the parameter's own flat numbering, and where it sits
// inside the rank's shard; an empty range (begin == end) when the rank holds none of it.
struct ShardSlice {
  int64_t param_begin = 0, param_end = 0, shard_offset = 0;
};
ShardSlice shard_slice(const FlatLayout& layout, const std::vector<int64_t>& numels, int64_t param, int64_t rank);

// Consecutive units grouped so each bucket holds at most bucket_elems elements (a unit larger than that is a bucket
// by itself). Returns the index of the first unit of every bucket.
std::vector<int64_t> plan_buckets(const std::vector<int64_t>& unit_elems, int64_t bucket_elems);

}  // namespace distributed
}  // namespace deepseek_ext
