// Exposes the DynamicBatcher core to Python as the TorchScript custom class torch.classes.deepseek_ext.BatchQueue
// (deepseek_ext/serving/batcher.py is its only user). PyTorch releases the GIL around every custom-class method
// call, so a worker thread blocked in next_batch() never holds up the threads that submit.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "batch_queue.h"

namespace deepseek_ext {
namespace serving {
namespace {

BatcherConfig make_config(int64_t max_batch_size, double max_delay_s, double latency_slo_s,
                          std::vector<int64_t> preferred, int64_t max_queue, int64_t num_workers, int64_t policy) {
  TORCH_CHECK_VALUE(policy == 0 || policy == 1, "BatchQueue: policy must be 0 (adaptive) or 1 (fixed), got ",
                    policy);
  BatcherConfig c;
  c.max_batch_size = max_batch_size;
  c.max_delay_s = max_delay_s;
  c.latency_slo_s = latency_slo_s;
  c.preferred_sizes = std::move(preferred);
  c.max_queue = max_queue;
  c.num_workers = num_workers;
  c.policy = static_cast<Policy>(policy);
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "DynamicBatcher: ", e.what());
  }
  return c;
}

struct BatchQueueHolder : torch::CustomClassHolder {
  BatchQueue queue;

  BatchQueueHolder(int64_t max_batch_size, double max_delay_s, double latency_slo_s, std::vector<int64_t> preferred,
                   int64_t max_queue, int64_t num_workers, int64_t policy)
      : queue(make_config(max_batch_size, max_delay_s, latency_slo_s, std::move(preferred), max_queue, num_workers,
                          policy)) {}

  // (ids to run, ids expired, group, finished)
  std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t, bool> next_batch(int64_t worker, double timeout_s,
                                                                                  double service_s) {
    TORCH_CHECK_VALUE(worker >= 0 && worker < queue.config().num_workers,
                      "BatchQueue.next_batch: worker must be in [0, num_workers), got ", worker);
    Batch b = queue.next_batch(worker, timeout_s, service_s);
    return {std::move(b.ids), std::move(b.expired), b.group, b.finished};
  }

  // (counters, batch-size histogram, latency figures in seconds, service-time estimate per size)
  std::tuple<c10::Dict<std::string, int64_t>, std::vector<int64_t>, c10::Dict<std::string, double>,
             std::vector<double>>
  stats() const {
    const QueueStats s = queue.stats();
    c10::Dict<std::string, int64_t> counters;
    counters.insert("requests", s.requests);
    counters.insert("batches", s.batches);
    counters.insert("rejected", s.rejected);
    counters.insert("timed_out", s.timed_out);
    counters.insert("cancelled", s.cancelled);
    counters.insert("queued", s.queued);
    counters.insert("in_flight", s.in_flight);
    counters.insert("target_batch_size", s.target);
    c10::Dict<std::string, double> figures;
    figures.insert("arrival_rate", s.arrival_rate);
    const std::pair<const char*, const LogHistogram*> hists[] = {
        {"queue_wait", &s.queue_wait}, {"compute", &s.service}, {"latency", &s.latency}};
    for (const auto& [name, h] : hists) {
      const std::string n(name);
      figures.insert(n + "_p50", h->quantile(0.50));
      figures.insert(n + "_p90", h->quantile(0.90));
      figures.insert(n + "_p99", h->quantile(0.99));
      figures.insert(n + "_max", h->max());
      figures.insert(n + "_mean", h->count() ? h->sum() / static_cast<double>(h->count()) : 0.0);
      figures.insert(n + "_sum", h->sum());
      figures.insert(n + "_count", static_cast<double>(h->count()));
    }
    return {counters, s.batch_sizes, figures, s.service_estimate};
  }
};

}  // namespace
}  // namespace serving
}  // namespace deepseek_ext

TORCH_LIBRARY_FRAGMENT(deepseek_ext, m) {
  using deepseek_ext::serving::BatchQueueHolder;
  m.class_<BatchQueueHolder>("BatchQueue")
      .def(torch::init<int64_t, double, double, std::vector<int64_t>, int64_t, int64_t, int64_t>())
      .def("push",
           [](const c10::intrusive_ptr<BatchQueueHolder>& self, int64_t id, int64_t group, double timeout_s) {
             return static_cast<int64_t>(self->queue.push(id, group, timeout_s));
           })
      .def("next_batch", &BatchQueueHolder::next_batch)
      .def("reap",
           [](const c10::intrusive_ptr<BatchQueueHolder>& self, double timeout_s) {
             bool finished = false;
             std::vector<int64_t> ids = self->queue.reap(timeout_s, finished);
             return std::make_tuple(ids, finished);
           })
      .def("close", [](const c10::intrusive_ptr<BatchQueueHolder>& self,
                       bool drain) { return self->queue.close(drain); })
      .def("closed", [](const c10::intrusive_ptr<BatchQueueHolder>& self) { return self->queue.closed(); })
      .def("now", [](const c10::intrusive_ptr<BatchQueueHolder>& self) { return self->queue.now(); })
      // The address of the queue, for the C-API fast path in serving_capi.cpp (valid while this object lives).
      .def("handle",
           [](const c10::intrusive_ptr<BatchQueueHolder>& self) {
             return static_cast<int64_t>(reinterpret_cast<intptr_t>(&self->queue));
           })
      .def("stats", &BatchQueueHolder::stats);
}
