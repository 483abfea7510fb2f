// Economics of a job: what per-step payment costs, beside a cloud hourly price the user supplies
// (meshtrain carries no price list of its own).
#include "meshtrain/market.h"

namespace meshtrain::market {

CostEstimate estimate_cost(Amount price_per_step, uint64_t steps, uint32_t peers, uint64_t samples_per_step,
                           double cloud_price_per_gpu_hour, double step_seconds) {
  if (peers == 0) throw InvalidArgumentError("cost estimate: peers must be at least 1");
  CostEstimate e;
  if (price_per_step > UINT64_MAX / peers)
    throw MarketError("amount_overflow", fmt::format("cost estimate: {} x {} peers overflows", price_per_step, peers));
  e.per_step = price_per_step * peers;
  if (steps != 0 && e.per_step > UINT64_MAX / steps)
    throw MarketError("amount_overflow", fmt::format("cost estimate: {} x {} steps overflows", e.per_step, steps));
  e.total = e.per_step * steps;
  if (samples_per_step > 0) e.per_1k_samples = 1000.0 * static_cast<double>(e.per_step) / static_cast<double>(samples_per_step);
  if (cloud_price_per_gpu_hour > 0 && step_seconds > 0)
    e.cloud_total = cloud_price_per_gpu_hour * peers * (static_cast<double>(steps) * step_seconds / 3600.0);
  return e;
}

}  // namespace meshtrain::market
