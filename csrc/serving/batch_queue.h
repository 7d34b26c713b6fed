// The C++ core of deepseek_ext.serving.DynamicBatcher: a request queue, its clock and the batching policy.
//
// The queue holds request ids only (the payloads stay in Python). Requests are grouped by an integer key (requests
// that can be stacked together share a key); a batch never mixes groups. Python worker threads block in
// next_batch(), which returns the ids of the next batch when one is due:
//   - a group holds at least the current target size, or
//   - the oldest request of a group has waited max_delay, or
//   - the queue is closed with drain (everything left goes out at once).
// With a latency SLO, a batch also goes out once waiting longer would leave too little time to serve it within
// the SLO. Requests whose deadline has passed are returned separately (to fail with a timeout), never in a batch.
//
// The target size (BatchPolicy) follows the arrival rate times the measured service time per batch: the smallest
// size b with rate * L(b) / workers <= 0.8 b, i.e. the batch that arrives while one batch is served, with 20%
// headroom for bursts. L(b) is a moving estimate per batch size, interpolated for sizes not measured yet. With a latency SLO the target is the largest
// size whose predicted queueing (99th percentile of Poisson arrivals, at most max_delay) plus service time fits in
// 85% of the SLO. The fixed policy (Ray Serve's @serve.batch, TorchServe) always waits for max_batch_size or max_delay.
//
// Standalone C++ (no torch), tested with GoogleTest in tests/cpp/test_batch_queue.cpp; bound to Python as
// torch.classes.deepseek_ext.BatchQueue in batcher_binding.cpp.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace deepseek_ext {
namespace serving {

enum class Policy { kAdaptive = 0, kFixed = 1 };

struct BatcherConfig {
  int64_t max_batch_size = 32;
  double max_delay_s = 0.005;
  double latency_slo_s = 0.0;            // <= 0: none
  std::vector<int64_t> preferred_sizes;  // sizes to prefer (sorted, unique, within [1, max_batch_size])
  int64_t max_queue = 1024;
  int64_t num_workers = 1;
  Policy policy = Policy::kAdaptive;

  // Throws std::invalid_argument naming the bad field; sorts and de-duplicates preferred_sizes.
  void validate();
};

// Latency samples in logarithmic buckets (16 per octave, 1 us .. ~1e5 s): fixed memory, percentiles within ~2.2%.
class LogHistogram {
 public:
  LogHistogram();
  void add(double seconds);
  int64_t count() const { return count_; }
  double sum() const { return sum_; }
  double max() const { return count_ ? max_ : 0.0; }
  // The q-quantile (q in [0, 1]) in seconds; 0 when empty.
  double quantile(double q) const;

 private:
  static constexpr int kPerOctave = 16;
  static constexpr double kMin = 1e-6;
  std::vector<int64_t> buckets_;
  int64_t count_ = 0;
  double sum_ = 0.0, min_ = 0.0, max_ = 0.0;
};

// The batch-size policy, with explicit times (seconds on any monotonic clock) so it can be tested without waiting.
class BatchPolicy {
 public:
  explicit BatchPolicy(const BatcherConfig& config);

  // Arrival-rate estimate: an exponentially decayed count (time constant kRateTau), bias-corrected at start-up.
  void on_arrival(double now);
  double arrival_rate(double now) const;

  // A served batch of `size` took `service_s` (moving average per size).
  void record(int64_t size, double service_s);
  // The service-time estimate for a batch of `size`: the size's own average, else interpolated between measured
  // sizes (extrapolated along the last slope above them, flat below them); < 0 when nothing is measured yet.
  double service_time(int64_t size) const;

  // The size a batch waits for (until max_delay): see the file comment. Rounded up to a preferred size.
  int64_t target(double now) const;
  // How many of `available` queued requests to take when a batch goes out; `oldest_age` is how long the oldest of
  // them has waited and `target` the current target(). At most max_batch_size; with an SLO, no more than what can
  // still finish in time (but at least the target); the largest preferred size that fits, when there is one.
  int64_t take(int64_t available, double oldest_age, int64_t target) const;

  // How long the oldest request of a group of `size` may wait before its batch must go out: max_delay, and with
  // an SLO no longer than what still leaves time to serve the batch within it.
  double max_wait(int64_t size) const;

  // Predicted latency of a request in a batch of `size` at arrival rate `rate`: queueing + service.
  double predicted_latency(int64_t size, double rate) const;

  static constexpr double kRateTau = 0.25;      // seconds
  static constexpr double kLatencyAlpha = 0.25;  // weight of a new sample in the per-size average
  // The target keeps the model at most this busy: batches of the bare minimum size (utilization 1) would turn
  // every burst into a backlog.
  static constexpr double kUtilization = 0.8;
  // Plans use this share of the SLO: the rest absorbs scheduling noise and error in the estimates.
  static constexpr double kSloHeadroom = 0.85;

 private:
  int64_t round_to_preferred(int64_t size) const;

  BatcherConfig cfg_;
  double rate_ = 0.0;       // decayed count / tau at time last_arrival_
  double last_arrival_ = 0.0;
  double first_arrival_ = -1.0;
  std::vector<double> latency_;  // per size (index = size), < 0: not measured
  std::vector<int64_t> measured_;  // sizes with a measurement, sorted
};

enum class PushStatus : int64_t { kOk = 0, kFull = 1, kClosed = 2 };

struct Batch {
  std::vector<int64_t> ids;      // to run, oldest first
  std::vector<int64_t> expired;  // deadline passed: fail with a timeout, do not run
  int64_t group = -1;
  bool finished = false;  // closed and nothing left: the worker should exit
};

struct QueueStats {
  int64_t requests = 0;  // accepted
  int64_t batches = 0;
  int64_t rejected = 0;   // queue full
  int64_t timed_out = 0;  // deadline passed in the queue
  int64_t cancelled = 0;  // failed by close(drain=false)
  int64_t queued = 0;
  int64_t in_flight = 0;  // requests in batches being served
  int64_t target = 1;
  double arrival_rate = 0.0;
  std::vector<int64_t> batch_sizes;  // histogram: batch_sizes[b] = batches of size b
  LogHistogram queue_wait, service, latency;  // per request, per batch, per request (enqueue to completion)
  std::vector<double> service_estimate;       // BatchPolicy::service_time for sizes 0..max (< 0: unknown)
};

class BatchQueue {
 public:
  using Clock = std::chrono::steady_clock;

  explicit BatchQueue(BatcherConfig config);

  // Enqueues request `id` in `group`; timeout_s > 0 sets a deadline. Never blocks on a full queue.
  PushStatus push(int64_t id, int64_t group, double timeout_s);

  // Blocks until a batch is due, requests expired, the queue finished, or timeout_s passed (then an empty Batch).
  // `worker` in [0, num_workers) identifies the caller; `service_s` is how long the batch it took on its previous
  // call took to serve (< 0: not representative, e.g. retried request by request; not used for the policy).
  Batch next_batch(int64_t worker, double timeout_s, double service_s);

  // Blocks until a queued request's deadline passes (returns the expired ids, removed from the queue), timeout_s
  // passes, or the queue closes (`finished` set). Lets a separate thread fail timed-out requests on time while
  // every worker is busy.
  std::vector<int64_t> reap(double timeout_s, bool& finished);

  // Stops accepting requests. drain: what is queued still goes out (immediately, ignoring target and delay);
  // otherwise the queued ids are removed and returned (to be failed). Wakes every worker.
  std::vector<int64_t> close(bool drain);
  bool closed() const;

  QueueStats stats() const;
  const BatcherConfig& config() const { return cfg_; }
  // Seconds on the queue's clock (steady_clock, zero at construction).
  double now() const;

 private:
  struct Entry {
    int64_t id;
    double enqueued;
    double deadline;  // +inf: none
  };
  struct InFlight {
    std::vector<double> enqueued;
    double dispatched = 0.0;
    bool active = false;
  };

  void finish_in_flight_locked(int64_t worker, double now, double service_s);
  // policy_.target(now), recomputed at most every kTargetRefresh seconds or after a new measurement (the search is
  // O(max_batch_size) and runs on every push while a worker waits).
  int64_t target_locked(double now);
  static constexpr double kTargetRefresh = 0.001;
  void expire_locked(double now, std::vector<int64_t>& out);
  // The group to dispatch now (-1: none) and the earliest time one becomes due by age.
  int64_t due_group_locked(double now, int64_t target, double& wake_at) const;

  BatcherConfig cfg_;
  BatchPolicy policy_;
  Clock::time_point epoch_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable reap_cv_;
  double reaper_wake_ = std::numeric_limits<double>::infinity();  // when a blocked reap() plans to wake
  std::unordered_map<int64_t, std::deque<Entry>> groups_;
  int64_t queued_ = 0;
  double next_deadline_;  // no queued deadline is earlier (may be stale-early)
  bool closed_ = false;
  int64_t waiting_ = 0;  // workers blocked in next_batch
  int64_t target_ = 1;
  double target_at_ = -1.0;  // when target_ was computed (< 0: stale)
  double planned_wake_ = std::numeric_limits<double>::infinity();  // when a blocked worker plans to wake
  std::vector<InFlight> in_flight_;
  QueueStats stats_;
};

}  // namespace serving
}  // namespace deepseek_ext
