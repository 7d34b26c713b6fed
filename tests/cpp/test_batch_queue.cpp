// The DynamicBatcher core (csrc/serving/batch_queue.*): policy arithmetic with explicit times, and the queue with
// real (short) waits and threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../../csrc/serving/batch_queue.h"

using deepseek_ext::serving::Batch;
using deepseek_ext::serving::BatcherConfig;
using deepseek_ext::serving::BatchPolicy;
using deepseek_ext::serving::BatchQueue;
using deepseek_ext::serving::LogHistogram;
using deepseek_ext::serving::Policy;
using deepseek_ext::serving::PushStatus;

namespace {

BatcherConfig config(int64_t max_batch, double delay_s, Policy policy = Policy::kAdaptive) {
  BatcherConfig c;
  c.max_batch_size = max_batch;
  c.max_delay_s = delay_s;
  c.policy = policy;
  return c;
}

// Arrivals at a constant rate for `seconds`, ending at time `end`.
void arrive(BatchPolicy& p, double rate, double seconds, double end) {
  const int n = static_cast<int>(rate * seconds);
  for (int i = 0; i < n; ++i) p.on_arrival(end - seconds + i / rate);
}

// L(b) = 2 ms + 0.25 ms * b, measured at every size.
void measure_linear(BatchPolicy& p, int64_t max) {
  for (int64_t b = 1; b <= max; ++b) p.record(b, 0.002 + 0.00025 * b);
}

TEST(BatcherConfig, ValidatesEveryField) {
  auto bad = [](auto edit) {
    BatcherConfig c;
    edit(c);
    EXPECT_THROW(c.validate(), std::invalid_argument);
  };
  bad([](BatcherConfig& c) { c.max_batch_size = 0; });
  bad([](BatcherConfig& c) { c.max_delay_s = -1; });
  bad([](BatcherConfig& c) { c.latency_slo_s = std::numeric_limits<double>::infinity(); });
  bad([](BatcherConfig& c) { c.max_queue = 0; });
  bad([](BatcherConfig& c) { c.num_workers = 0; });
  bad([](BatcherConfig& c) { c.preferred_sizes = {4, 64}; });
  BatcherConfig ok;
  ok.preferred_sizes = {8, 4, 8};
  ok.validate();
  EXPECT_EQ(ok.preferred_sizes, (std::vector<int64_t>{4, 8}));
}

TEST(LogHistogram, QuantilesWithinBucketResolution) {
  LogHistogram h;
  EXPECT_EQ(h.quantile(0.5), 0.0);
  for (int i = 1; i <= 1000; ++i) h.add(i * 1e-3);
  EXPECT_NEAR(h.quantile(0.5), 0.5, 0.5 * 0.025);
  EXPECT_NEAR(h.quantile(0.99), 0.99, 0.99 * 0.025);
  EXPECT_DOUBLE_EQ(h.quantile(1.0), 1.0);
  EXPECT_DOUBLE_EQ(h.quantile(0.0), 1e-3);
  EXPECT_EQ(h.count(), 1000);
  EXPECT_NEAR(h.sum(), 500.5, 1e-9);
}

TEST(BatchPolicy, ArrivalRateFollowsTheLoad) {
  BatchPolicy p(config(32, 0.005));
  EXPECT_EQ(p.arrival_rate(0.0), 0.0);
  arrive(p, 1000, 2.0, 2.0);
  EXPECT_NEAR(p.arrival_rate(2.0), 1000, 30);
  arrive(p, 100, 2.0, 4.0);  // the load drops: the estimate follows within a couple of time constants
  EXPECT_NEAR(p.arrival_rate(4.0), 100, 10);
  EXPECT_LT(p.arrival_rate(10.0), 1.0);  // silence decays it
}

TEST(BatchPolicy, ServiceTimeInterpolatesAndExtrapolates) {
  BatchPolicy p(config(32, 0.005));
  EXPECT_LT(p.service_time(4), 0);
  p.record(1, 0.001);
  EXPECT_DOUBLE_EQ(p.service_time(8), 0.001);  // one size known: flat
  p.record(9, 0.003);
  EXPECT_NEAR(p.service_time(5), 0.002, 1e-12);
  EXPECT_NEAR(p.service_time(17), 0.003 + 0.00025 * 8, 1e-12);  // along the slope from size 1 to size 9
  p.record(9, 0.007);                                             // moving average
  EXPECT_NEAR(p.service_time(9), 0.003 + BatchPolicy::kLatencyAlpha * 0.004, 1e-12);
}

TEST(BatchPolicy, TargetGrowsWithTheArrivalRate) {
  BatchPolicy p(config(32, 0.005));
  EXPECT_EQ(p.target(0.0), 1);  // nothing measured: do not wait
  measure_linear(p, 32);
  arrive(p, 100, 2.0, 2.0);
  EXPECT_EQ(p.target(2.0), 1);  // 100/s * 2.25 ms << 1
  BatchPolicy q(config(32, 0.005));
  measure_linear(q, 32);
  arrive(q, 1000, 2.0, 2.0);
  // Smallest b with ~1000 * (2 + 0.25 b) ms <= 0.8 b: b >= 3.64.
  EXPECT_GE(q.target(2.0), 4);
  EXPECT_LE(q.target(2.0), 5);
  BatchPolicy r(config(32, 0.005));
  measure_linear(r, 32);
  arrive(r, 4000, 2.0, 2.0);
  EXPECT_EQ(r.target(2.0), 32);  // beyond capacity at every size: the largest batch
}

TEST(BatchPolicy, SloPicksTheLargestBatchThatFits) {
  BatcherConfig c = config(64, 0.050);
  c.latency_slo_s = 0.030;
  BatchPolicy p(c);
  measure_linear(p, 64);
  arrive(p, 1000, 2.0, 2.0);
  const int64_t t = p.target(2.0);
  const double rate = p.arrival_rate(2.0);
  const double budget = BatchPolicy::kSloHeadroom * 0.030;
  EXPECT_LE(p.predicted_latency(t, rate), budget);
  EXPECT_GT(p.predicted_latency(t + 1, rate), budget);
  EXPECT_GT(t, 5);  // larger than the no-SLO target (4 or 5)
  // A backlog whose oldest request already waited long enough to leave 10.1 ms: no batch that cannot finish in
  // it, unless the target itself is larger.
  const int64_t k = p.take(64, budget - 0.0101, t);
  EXPECT_EQ(k, std::max<int64_t>(t, 32));  // L(32) = 10 ms
}

TEST(BatchPolicy, SloBoundsTheWait) {
  BatcherConfig c = config(64, 0.100);
  c.latency_slo_s = 0.020;
  BatchPolicy p(c);
  EXPECT_DOUBLE_EQ(p.max_wait(4), 0.100);  // nothing measured: max_delay
  measure_linear(p, 64);
  EXPECT_NEAR(p.max_wait(4), BatchPolicy::kSloHeadroom * 0.020 - 0.003, 1e-12);
  EXPECT_EQ(p.max_wait(64), 0.0);  // L(64) = 18 ms > 85% of the 20 ms SLO: go at once
  BatchPolicy no_slo(config(64, 0.100));
  measure_linear(no_slo, 64);
  EXPECT_DOUBLE_EQ(no_slo.max_wait(4), 0.100);
}

TEST(BatchPolicy, FixedPolicyAndPreferredSizes) {
  BatchPolicy fixed(config(16, 0.005, Policy::kFixed));
  EXPECT_EQ(fixed.target(0.0), 16);
  BatcherConfig c = config(32, 0.005);
  c.preferred_sizes = {4, 8, 16};
  BatchPolicy p(c);
  EXPECT_EQ(p.target(0.0), 4);  // 1 rounded up to a preferred size
  EXPECT_EQ(p.take(7, 0.0, 4), 4);
  EXPECT_EQ(p.take(31, 0.0, 4), 16);
  EXPECT_EQ(p.take(3, 0.0, 4), 3);  // forced out by the delay: smaller than every preferred size
}

TEST(BatchQueue, DispatchesAtTheTargetSizeOrAfterTheDelay) {
  BatchQueue q(config(4, 0.030, Policy::kFixed));
  for (int i = 0; i < 6; ++i) ASSERT_EQ(q.push(i, 0, 0), PushStatus::kOk);
  Batch b = q.next_batch(0, 1.0, -1);
  EXPECT_EQ(b.ids, (std::vector<int64_t>{0, 1, 2, 3}));  // full batch at once, oldest first
  const auto start = std::chrono::steady_clock::now();
  b = q.next_batch(0, 1.0, 0.001);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(b.ids, (std::vector<int64_t>{4, 5}));
  EXPECT_GE(waited, 0.020);  // until the oldest had waited 30 ms (it was queued a little earlier)
  EXPECT_LT(waited, 0.5);
  const auto s = q.stats();
  EXPECT_EQ(s.batches, 2);
  EXPECT_EQ(s.batch_sizes[4], 1);
  EXPECT_EQ(s.batch_sizes[2], 1);
  EXPECT_EQ(s.service.count(), 1);
}

TEST(BatchQueue, NeverMixesGroups) {
  BatchQueue q(config(8, 0.0));
  for (int i = 0; i < 6; ++i) ASSERT_EQ(q.push(i, i % 2, 0), PushStatus::kOk);
  std::set<int64_t> seen;
  for (int k = 0; k < 2; ++k) {
    Batch b = q.next_batch(0, 1.0, -1);
    ASSERT_EQ(b.ids.size(), 3u);
    for (int64_t id : b.ids) {
      EXPECT_EQ(id % 2, b.group);
      seen.insert(id);
    }
  }
  EXPECT_EQ(seen.size(), 6u);
}

TEST(BatchQueue, BackPressureAndClose) {
  BatcherConfig c = config(8, 1.0, Policy::kFixed);
  c.max_queue = 3;
  BatchQueue q(c);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(q.push(i, 0, 0), PushStatus::kOk);
  EXPECT_EQ(q.push(3, 0, 0), PushStatus::kFull);
  EXPECT_EQ(q.stats().rejected, 1);
  auto cancelled = q.close(false);
  std::sort(cancelled.begin(), cancelled.end());
  EXPECT_EQ(cancelled, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(q.push(4, 0, 0), PushStatus::kClosed);
  EXPECT_TRUE(q.next_batch(0, 1.0, -1).finished);
}

TEST(BatchQueue, DrainSendsEverythingAtOnce) {
  BatchQueue q(config(8, 10.0, Policy::kFixed));  // would otherwise wait 10 s
  for (int i = 0; i < 11; ++i) q.push(i, 0, 0);
  EXPECT_TRUE(q.close(true).empty());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(q.next_batch(0, 5.0, -1).ids.size(), 8u);
  EXPECT_EQ(q.next_batch(0, 5.0, -1).ids.size(), 3u);
  EXPECT_TRUE(q.next_batch(0, 5.0, -1).finished);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
}

TEST(BatchQueue, ExpiredRequestsAreReturnedNotRun) {
  BatchQueue q(config(8, 10.0, Policy::kFixed));
  q.push(0, 0, 0.010);
  q.push(1, 0, 0);
  Batch b = q.next_batch(0, 2.0, -1);  // wakes at the deadline, not after the 10 s delay
  EXPECT_TRUE(b.ids.empty());
  EXPECT_EQ(b.expired, (std::vector<int64_t>{0}));
  EXPECT_EQ(q.stats().timed_out, 1);
  EXPECT_EQ(q.stats().queued, 1);
}

TEST(BatchQueue, ReapFailsDeadlinesWhileWorkersAreBusy) {
  BatchQueue q(config(8, 10.0, Policy::kFixed));
  bool finished = false;
  std::vector<int64_t> reaped;
  std::thread reaper([&] { reaped = q.reap(2.0, finished); });  // waits before any request exists
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  q.push(0, 0, 0.020);  // an earlier deadline than the reaper planned for: it must wake for it
  q.push(1, 0, 0);
  const auto start = std::chrono::steady_clock::now();
  reaper.join();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
  EXPECT_EQ(reaped, (std::vector<int64_t>{0}));
  EXPECT_FALSE(finished);
  q.close(true);
  EXPECT_TRUE(q.reap(1.0, finished).empty());
  EXPECT_TRUE(finished);
}

TEST(BatchQueue, ManyProducersOneConsumerLoseNothing) {
  BatchQueue q(config(32, 0.001));
  constexpr int kThreads = 4, kEach = 5000;
  std::atomic<int> rejected{0};
  std::vector<std::thread> producers;
  for (int t = 0; t < kThreads; ++t) {
    producers.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        if (q.push(t * kEach + i, 0, 0) != PushStatus::kOk) {
          ++rejected;
          std::this_thread::yield();
          --i;  // retry: the queue was full
        }
      }
    });
  }
  std::vector<int64_t> got;
  while (static_cast<int>(got.size()) < kThreads * kEach) {
    Batch b = q.next_batch(0, 1.0, 1e-5);
    ASSERT_LE(b.ids.size(), 32u);
    got.insert(got.end(), b.ids.begin(), b.ids.end());
  }
  for (auto& p : producers) p.join();
  std::sort(got.begin(), got.end());
  for (int i = 0; i < kThreads * kEach; ++i) ASSERT_EQ(got[i], i);
  EXPECT_EQ(q.stats().requests, kThreads * kEach);
}

}  // namespace
