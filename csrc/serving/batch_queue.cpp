#include "batch_queue.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace deepseek_ext {
namespace serving {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// z for the 99th percentile of the normal approximation to the time b - 1 Poisson arrivals take.
constexpr double kZ99 = 2.33;

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace

void BatcherConfig::validate() {
  require(max_batch_size >= 1 && max_batch_size <= (1 << 20),
          "max_batch_size must be in [1, 1048576], got " + std::to_string(max_batch_size));
  require(std::isfinite(max_delay_s) && max_delay_s >= 0, "max_delay_ms must be finite and >= 0");
  require(std::isfinite(latency_slo_s) && latency_slo_s >= 0, "latency_slo_ms must be finite and > 0 (or None)");
  require(max_queue >= 1, "max_queue must be >= 1, got " + std::to_string(max_queue));
  require(num_workers >= 1 && num_workers <= 1024, "num_workers must be in [1, 1024], got " + std::to_string(num_workers));
  for (int64_t p : preferred_sizes) {
    require(p >= 1 && p <= max_batch_size, "preferred_batch_sizes must lie in [1, max_batch_size=" +
                                               std::to_string(max_batch_size) + "], got " + std::to_string(p));
  }
  std::sort(preferred_sizes.begin(), preferred_sizes.end());
  preferred_sizes.erase(std::unique(preferred_sizes.begin(), preferred_sizes.end()), preferred_sizes.end());
}

// ---------------------------------------------------------------------------------------------------------------
// LogHistogram

LogHistogram::LogHistogram() : buckets_(kPerOctave * 37, 0) {}

void LogHistogram::add(double s) {
  if (!(s >= 0)) s = 0;  // NaN or a clock step backwards
  int64_t i = s <= kMin ? 0 : static_cast<int64_t>(std::log2(s / kMin) * kPerOctave);
  i = std::clamp<int64_t>(i, 0, static_cast<int64_t>(buckets_.size()) - 1);
  ++buckets_[i];
  min_ = count_ == 0 ? s : std::min(min_, s);
  max_ = count_ == 0 ? s : std::max(max_, s);
  ++count_;
  sum_ += s;
}

double LogHistogram::quantile(double q) const {
  if (count_ == 0) return 0.0;
  if (q <= 0.0) return min_;
  if (q >= 1.0) return max_;
  // The sample of rank ceil(q * count) (1-based, at least 1): the nearest-rank definition.
  const int64_t rank = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(q * static_cast<double>(count_))));
  int64_t seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen >= rank) {
      const double mid = kMin * std::exp2((static_cast<double>(i) + 0.5) / kPerOctave);
      return std::clamp(mid, min_, max_);
    }
  }
  return max_;
}

// ---------------------------------------------------------------------------------------------------------------
// BatchPolicy

BatchPolicy::BatchPolicy(const BatcherConfig& config) : cfg_(config), latency_(config.max_batch_size + 1, -1.0) {}

void BatchPolicy::on_arrival(double now) {
  if (first_arrival_ < 0) {
    first_arrival_ = last_arrival_ = now;
    rate_ = 1.0 / kRateTau;
    return;
  }
  const double dt = std::max(0.0, now - last_arrival_);
  rate_ = rate_ * std::exp(-dt / kRateTau) + 1.0 / kRateTau;
  last_arrival_ = std::max(last_arrival_, now);
}

double BatchPolicy::arrival_rate(double now) const {
  if (first_arrival_ < 0) return 0.0;
  const double r = rate_ * std::exp(-std::max(0.0, now - last_arrival_) / kRateTau);
  // The decayed count over a span S has mean rate * (1 - exp(-S / tau)); correct for it, by at most 1 / (1 - 1/e),
  // so a handful of early arrivals cannot suggest an absurd rate.
  const double span = std::max(now - first_arrival_, kRateTau);
  return r / (1.0 - std::exp(-span / kRateTau));
}

void BatchPolicy::record(int64_t size, double service_s) {
  if (size < 1 || size > cfg_.max_batch_size || !(service_s >= 0) || !std::isfinite(service_s)) return;
  double& est = latency_[size];
  if (est < 0) {
    est = service_s;
    measured_.insert(std::upper_bound(measured_.begin(), measured_.end(), size), size);
  } else {
    est += kLatencyAlpha * (service_s - est);
  }
}

double BatchPolicy::service_time(int64_t size) const {
  if (measured_.empty() || size < 1) return -1.0;
  size = std::min(size, cfg_.max_batch_size);
  if (latency_[size] >= 0) return latency_[size];
  auto hi = std::upper_bound(measured_.begin(), measured_.end(), size);
  if (hi == measured_.begin()) return latency_[*hi];  // below every measured size: flat (conservative)
  const int64_t lo = *(hi - 1);
  if (hi != measured_.end()) {
    const double t = static_cast<double>(size - lo) / static_cast<double>(*hi - lo);
    return latency_[lo] + t * (latency_[*hi] - latency_[lo]);
  }
  // Above every measured size: along the slope between the smallest and the largest measured sizes (a robust
  // affine fit of cost vs size), never decreasing.
  const int64_t first = measured_.front();
  if (first == lo) return latency_[lo];
  const double slope = std::max(0.0, (latency_[lo] - latency_[first]) / static_cast<double>(lo - first));
  return latency_[lo] + slope * static_cast<double>(size - lo);
}

double BatchPolicy::predicted_latency(int64_t size, double rate) const {
  const double service = std::max(0.0, service_time(size));
  double fill = 0.0;
  if (size > 1) {
    const double k = static_cast<double>(size - 1);
    fill = rate > 0 ? (k + kZ99 * std::sqrt(k)) / rate : kInf;
  }
  return std::min(fill, cfg_.max_delay_s) + service;
}

double BatchPolicy::max_wait(int64_t size) const {
  if (cfg_.policy != Policy::kAdaptive || cfg_.latency_slo_s <= 0) return cfg_.max_delay_s;
  const double service = service_time(std::min(size, cfg_.max_batch_size));
  if (service < 0) return cfg_.max_delay_s;
  return std::min(cfg_.max_delay_s, std::max(0.0, kSloHeadroom * cfg_.latency_slo_s - service));
}

int64_t BatchPolicy::round_to_preferred(int64_t size) const {
  const auto& p = cfg_.preferred_sizes;
  if (p.empty()) return size;
  auto it = std::lower_bound(p.begin(), p.end(), size);
  return it == p.end() ? p.back() : *it;
}

int64_t BatchPolicy::target(double now) const {
  const int64_t max = cfg_.max_batch_size;
  if (cfg_.policy == Policy::kFixed) return round_to_preferred(max);
  if (measured_.empty()) return round_to_preferred(1);
  const double rate = arrival_rate(now);
  const double per_worker = rate / static_cast<double>(cfg_.num_workers);
  // The smallest batch that keeps up with arrivals with headroom: per_worker * L(b) <= kUtilization * b, i.e. what
  // arrives while one batch is served, plus a margin for bursts (max if none: overload).
  int64_t b0 = max;
  for (int64_t b = 1; b <= max; ++b) {
    if (per_worker * service_time(b) <= kUtilization * static_cast<double>(b)) {
      b0 = b;
      break;
    }
  }
  if (cfg_.latency_slo_s > 0) {
    // The largest size at least as large as b0 whose predicted latency meets the SLO (b0 itself if none does).
    for (int64_t b = max; b > b0; --b) {
      if (predicted_latency(b, rate) <= kSloHeadroom * cfg_.latency_slo_s) {
        b0 = b;
        break;
      }
    }
  }
  return round_to_preferred(b0);
}

int64_t BatchPolicy::take(int64_t available, double oldest_age, int64_t target) const {
  int64_t n = std::min(available, cfg_.max_batch_size);
  if (cfg_.policy == Policy::kAdaptive && cfg_.latency_slo_s > 0 && !measured_.empty()) {
    // Backlog under an SLO: no more than what can still finish in time, but never below the target (the smallest
    // batch that keeps up with arrivals).
    int64_t cap = 1;
    const double budget = kSloHeadroom * cfg_.latency_slo_s - oldest_age;
    for (int64_t b = cfg_.max_batch_size; b >= 1; --b) {
      if (service_time(b) <= budget) {
        cap = b;
        break;
      }
    }
    n = std::min(n, std::max(cap, target));
  }
  const auto& p = cfg_.preferred_sizes;
  auto it = std::upper_bound(p.begin(), p.end(), n);
  if (it != p.begin()) n = *(it - 1);  // the largest preferred size that fits
  return std::max<int64_t>(1, n);
}

// ---------------------------------------------------------------------------------------------------------------
// BatchQueue

namespace {
BatcherConfig validated(BatcherConfig c) {
  c.validate();
  return c;
}
}  // namespace

BatchQueue::BatchQueue(BatcherConfig config)
    : cfg_(validated(std::move(config))),
      policy_(cfg_),
      epoch_(Clock::now()),
      next_deadline_(kInf),
      in_flight_(cfg_.num_workers) {
  stats_.batch_sizes.assign(cfg_.max_batch_size + 1, 0);
}

double BatchQueue::now() const { return std::chrono::duration<double>(Clock::now() - epoch_).count(); }

bool BatchQueue::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

PushStatus BatchQueue::push(int64_t id, int64_t group, double timeout_s) {
  bool notify = false, notify_reaper = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return PushStatus::kClosed;
    if (queued_ >= cfg_.max_queue) {
      ++stats_.rejected;
      return PushStatus::kFull;
    }
    const double t = now();
    const double deadline = timeout_s > 0 ? t + timeout_s : kInf;
    auto& q = groups_[group];
    q.push_back(Entry{id, t, deadline});
    ++queued_;
    ++stats_.requests;
    policy_.on_arrival(t);
    next_deadline_ = std::min(next_deadline_, deadline);
    notify_reaper = deadline < reaper_wake_;
    if (waiting_ > 0) {
      // Wake a worker only when this request changes what it waits for: a batch became due by size, or a wake-up
      // (this group's max_delay, this request's deadline) is now earlier than the one it planned.
      const double due = q.front().enqueued + policy_.max_wait(static_cast<int64_t>(q.size()));
      notify = due < planned_wake_ || deadline < planned_wake_ || static_cast<int64_t>(q.size()) >= target_locked(t);
    }
  }
  if (notify) cv_.notify_one();
  if (notify_reaper) reap_cv_.notify_all();
  return PushStatus::kOk;
}

std::vector<int64_t> BatchQueue::reap(double timeout_s, bool& finished) {
  std::unique_lock<std::mutex> lock(mu_);
  const double end = now() + std::max(0.0, timeout_s);
  std::vector<int64_t> out;
  for (;;) {
    const double t = now();
    if (t >= next_deadline_) expire_locked(t, out);
    finished = closed_;
    if (!out.empty() || closed_ || t >= end) return out;
    reaper_wake_ = std::min(end, next_deadline_);
    reap_cv_.wait_until(lock,
                        epoch_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(reaper_wake_)));
    reaper_wake_ = kInf;
  }
}

int64_t BatchQueue::target_locked(double now) {
  if (target_at_ < 0 || now - target_at_ >= kTargetRefresh || now < target_at_) {
    target_ = policy_.target(now);
    target_at_ = now;
  }
  return target_;
}

void BatchQueue::finish_in_flight_locked(int64_t worker, double now, double service_s) {
  InFlight& f = in_flight_[worker];
  if (!f.active) return;
  const int64_t size = static_cast<int64_t>(f.enqueued.size());
  stats_.service.add(service_s >= 0 ? service_s : now - f.dispatched);
  if (service_s >= 0) {
    policy_.record(size, service_s);
    target_at_ = -1.0;  // a new measurement: recompute the target
  }
  for (double e : f.enqueued) stats_.latency.add(now - e);
  stats_.in_flight -= size;
  f.active = false;
}

void BatchQueue::expire_locked(double now, std::vector<int64_t>& out) {
  double next = kInf;
  for (auto it = groups_.begin(); it != groups_.end();) {
    auto& q = it->second;
    auto keep = q.begin();
    for (auto e = q.begin(); e != q.end(); ++e) {
      if (e->deadline <= now) {
        out.push_back(e->id);
      } else {
        next = std::min(next, e->deadline);
        *keep++ = *e;
      }
    }
    q.erase(keep, q.end());
    it = q.empty() ? groups_.erase(it) : std::next(it);
  }
  const int64_t n = static_cast<int64_t>(out.size());
  stats_.timed_out += n;
  queued_ -= n;
  next_deadline_ = next;
}

int64_t BatchQueue::due_group_locked(double now, int64_t target, double& wake_at) const {
  int64_t best = -1;
  double best_age = -1.0;
  for (const auto& [group, q] : groups_) {
    const double oldest = q.front().enqueued;
    const double age = now - oldest;
    const double wait = policy_.max_wait(static_cast<int64_t>(q.size()));
    if (closed_ || static_cast<int64_t>(q.size()) >= target || age >= wait) {
      if (age > best_age) {
        best = group;
        best_age = age;
      }
    } else {
      wake_at = std::min(wake_at, oldest + wait);
    }
  }
  return best;
}

Batch BatchQueue::next_batch(int64_t worker, double timeout_s, double service_s) {
  if (worker < 0 || worker >= cfg_.num_workers) {
    throw std::invalid_argument("next_batch: worker must be in [0, num_workers), got " + std::to_string(worker));
  }
  std::unique_lock<std::mutex> lock(mu_);
  double t = now();
  finish_in_flight_locked(worker, t, service_s);
  const double end = t + std::max(0.0, timeout_s);
  Batch b;
  for (;;) {
    t = now();
    if (t >= next_deadline_) expire_locked(t, b.expired);
    const int64_t target = target_locked(t);
    stats_.target = target;
    double wake = end;
    const int64_t g = due_group_locked(t, target, wake);
    if (g >= 0) {
      auto& q = groups_[g];
      const int64_t k = policy_.take(static_cast<int64_t>(q.size()), t - q.front().enqueued, target);
      InFlight& f = in_flight_[worker];
      f.enqueued.clear();
      b.ids.reserve(k);
      for (int64_t i = 0; i < k; ++i) {
        const Entry& e = q.front();
        b.ids.push_back(e.id);
        f.enqueued.push_back(e.enqueued);
        stats_.queue_wait.add(t - e.enqueued);
        q.pop_front();
      }
      if (q.empty()) groups_.erase(g);
      f.dispatched = t;
      f.active = true;
      b.group = g;
      queued_ -= k;
      stats_.in_flight += k;
      ++stats_.batches;
      ++stats_.batch_sizes[k];
      const bool more = queued_ > 0 && waiting_ > 0;
      lock.unlock();
      if (more) cv_.notify_one();  // another idle worker may have a batch due too
      return b;
    }
    if (!b.expired.empty()) return b;
    if (closed_ && queued_ == 0) {
      b.finished = true;
      return b;
    }
    if (t >= end) return b;
    wake = std::min(wake, next_deadline_);
    planned_wake_ = wake;
    ++waiting_;
    cv_.wait_until(lock, epoch_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(wake)));
    --waiting_;
    planned_wake_ = kInf;
  }
}

std::vector<int64_t> BatchQueue::close(bool drain) {
  std::vector<int64_t> cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    if (!drain) {
      for (auto& [group, q] : groups_) {
        for (const Entry& e : q) cancelled.push_back(e.id);
      }
      groups_.clear();
      stats_.cancelled += static_cast<int64_t>(cancelled.size());
      queued_ = 0;
      next_deadline_ = kInf;
    }
  }
  cv_.notify_all();
  reap_cv_.notify_all();
  return cancelled;
}

QueueStats BatchQueue::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  const double t = now();
  QueueStats s = stats_;
  s.queued = queued_;
  s.arrival_rate = policy_.arrival_rate(t);
  s.target = policy_.target(t);
  s.service_estimate.resize(cfg_.max_batch_size + 1);
  s.service_estimate[0] = -1.0;
  for (int64_t b = 1; b <= cfg_.max_batch_size; ++b) s.service_estimate[b] = policy_.service_time(b);
  return s;
}

}  // namespace serving
}  // namespace deepseek_ext
