// Exposes the DynamicSampler core to Python as the TorchScript custom class
// torch.classes.deepseek_ext.ClassSampler (deepseek_ext/data/sampler.py is its only user).
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <stdexcept>

#include "sampler_core.h"

namespace deepseek_ext {
namespace data {
namespace {

template <typename Fn>
decltype(auto) rethrow_as_value_error(Fn&& fn) {
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

struct ClassSamplerHolder : torch::CustomClassHolder {
  ClassSampler core;

  static ClassSampler make(const at::Tensor& labels, int64_t num_classes, int64_t seed, int64_t replicas,
                           int64_t rank) {
    TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong && labels.dim() == 1,
                     "ClassSampler: expected labels as a 1-D int64 tensor, but got ", labels.scalar_type(), " of shape ",
                     labels.sizes());
    const at::Tensor l = labels.cpu().contiguous();
    return rethrow_as_value_error([&] {
      return ClassSampler(l.const_data_ptr<int64_t>(), l.numel(), num_classes, static_cast<uint64_t>(seed), replicas,
                          rank);
    });
  }

  ClassSamplerHolder(const at::Tensor& labels, int64_t num_classes, int64_t seed, int64_t replicas, int64_t rank)
      : core(make(labels, num_classes, seed, replicas, rank)) {}

  at::Tensor draw(int64_t count, bool replacement) {
    TORCH_CHECK_VALUE(count >= 0, "ClassSampler.draw: count must be non-negative, got ", count);
    at::Tensor out = at::empty({count}, at::kLong);
    core.draw(count, replacement, out.data_ptr<int64_t>());
    return out;
  }
};

}  // namespace
}  // namespace data
}  // namespace deepseek_ext

TORCH_LIBRARY_FRAGMENT(deepseek_ext, m) {
  using deepseek_ext::data::ClassSamplerHolder;
  m.class_<ClassSamplerHolder>("ClassSampler")
      .def(torch::init<at::Tensor, int64_t, int64_t, int64_t, int64_t>())
      .def("draw", &ClassSamplerHolder::draw)
      .def("set_weights",
           [](const c10::intrusive_ptr<ClassSamplerHolder>& self, std::vector<double> w) {
             deepseek_ext::data::rethrow_as_value_error([&] { self->core.set_weights(w); });
           })
      .def("weights", [](const c10::intrusive_ptr<ClassSamplerHolder>& self) { return self->core.weights(); })
      .def("set_epoch", [](const c10::intrusive_ptr<ClassSamplerHolder>& self, int64_t e) { self->core.set_epoch(e); })
      .def("drawn", [](const c10::intrusive_ptr<ClassSamplerHolder>& self) { return self->core.drawn(); })
      .def("class_sizes", [](const c10::intrusive_ptr<ClassSamplerHolder>& self) { return self->core.class_sizes(); })
      .def("state", [](const c10::intrusive_ptr<ClassSamplerHolder>& self) { return self->core.state(); })
      .def("load_state",
           [](const c10::intrusive_ptr<ClassSamplerHolder>& self, std::vector<int64_t> s) {
             deepseek_ext::data::rethrow_as_value_error([&] { self->core.load_state(s); });
           })
      .def_static("bytes_per_item", []() { return deepseek_ext::data::ClassSampler::kBytesPerItem; });
}
