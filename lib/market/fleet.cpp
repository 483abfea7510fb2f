// Fleet: keeps N providers leased and paid, replacing the ones that fail.
//
// A provider has failed when the market has not heard its heartbeat for heartbeat_timeout, when
// its daemon does not acknowledge a voucher, or when the caller says so (its worker left the
// quorum). Its lease is closed as ProviderFailed with the latest voucher settled, so it is paid
// exactly for the steps it was paid for, and a replacement is rented within the same budget.
#include <algorithm>
#include <map>
#include <mutex>
#include <set>

#include "meshtrain/market.h"

namespace meshtrain::market {
struct Fleet::Impl {
  Impl(MarketClient& c, MarketBackend& b, FleetOptions o) : client(c), backend(b), options(std::move(o)) {}
  MarketClient& client;
  MarketBackend& backend;
  FleetOptions options;
  std::set<AccountId> failed;  // reported or detected, not yet handled
  std::set<AccountId> avoid;   // providers that failed before: not rented again by this fleet
  // When each lease was last checked at the market: at most every heartbeat_timeout / 4, so a
  // fast step loop does not query the market every step.
  std::map<Id, Clock::time_point> checked;
  bool budget_exhausted = false;

  void emit(FleetEvent::Kind kind, const Lease& lease, std::string detail) {
    log::info("market", "fleet: {} lease {} provider {}: {}",
              kind == FleetEvent::Kind::Leased           ? "leased"
              : kind == FleetEvent::Kind::ProviderFailed ? "provider failed on"
              : kind == FleetEvent::Kind::Replaced       ? "replaced with"
              : kind == FleetEvent::Kind::Released       ? "released"
                                                         : "budget exhausted at",
              lease.id, lease.provider.fingerprint(), detail);
    if (options.on_event) options.on_event(FleetEvent{kind, lease.id, lease.provider, std::move(detail)});
  }

  // Rents until `size` leases are held or the market has no more suitable bids. Returns the new ones.
  std::vector<Lease> top_up() {
    std::vector<Lease> added;
    if (budget_exhausted) return added;
    for (int round = 0; round < 3; ++round) {
      size_t held = client.leases().size();
      if (held >= options.size) break;
      std::vector<Lease> got;
      try {
        got = client.rent(static_cast<uint32_t>(options.size - held), options.filter, options.rent_wait);
      } catch (const MarketError& e) {
        if (e.reason() != "spend_limit") throw;
        budget_exhausted = true;
        emit(FleetEvent::Kind::BudgetExhausted, Lease{}, e.what());
        break;
      }
      for (const Lease& l : got) {
        if (avoid.count(l.provider)) {
          // A provider that failed us before: hand the lease back unused.
          client.release(l.id, CloseReason::RenterDone);
          continue;
        }
        added.push_back(l);
      }
      if (got.empty()) break;
    }
    return added;
  }

  void handle_failure(const Lease& lease, const std::string& why) {
    avoid.insert(lease.provider);
    checked.erase(lease.id);
    try {
      Lease closed = client.release(lease.id, CloseReason::ProviderFailed);
      emit(FleetEvent::Kind::ProviderFailed, closed, why);
    } catch (const Error& e) {
      // The market may have closed it already (expiry, the provider closed it): forget it.
      client.forget(lease.id);
      emit(FleetEvent::Kind::ProviderFailed, lease, fmt::format("{} (closing: {})", why, e.what()));
    }
  }
};

Fleet::Fleet(MarketClient& client, MarketBackend& backend, FleetOptions options)
    : impl_(std::make_unique<Impl>(client, backend, std::move(options))) {
  if (impl_->options.size == 0) throw InvalidArgumentError("fleet: size must be at least 1");
}

Fleet::~Fleet() = default;

void Fleet::fill() {
  for (const Lease& l : impl_->top_up()) impl_->emit(FleetEvent::Kind::Leased, l, "");
}

void Fleet::report_failed(const AccountId& provider, const std::string& why) {
  log::info("market", "fleet: provider {} reported failed: {}", provider.fingerprint(), why);
  impl_->failed.insert(provider);
}

std::vector<Lease> Fleet::pay_step(uint64_t step) {
  std::vector<std::pair<Lease, std::string>> failures;
  std::exception_ptr budget_error;
  for (const Lease& held : impl_->client.leases()) {
    if (impl_->failed.count(held.provider)) {
      failures.push_back({held, "reported by the caller"});
      continue;
    }
    // The market's view: closed by the provider or by expiry, or the provider went silent.
    auto& last = impl_->checked[held.id];
    if (Clock::now() - last >= impl_->options.heartbeat_timeout / 4) {
      last = Clock::now();
      Lease now = impl_->backend.lease(held.id);
      if (now.state != LeaseState::Open) {
        impl_->client.forget(held.id);
        impl_->checked.erase(held.id);
        impl_->emit(FleetEvent::Kind::Released, now,
                    fmt::format("closed at the market ({})", close_reason_name(now.close_reason)));
        continue;
      }
      TimeMs silent_ms = wall_clock_ms() - now.provider_last_heartbeat_ms;
      if (now.provider_last_heartbeat_ms == 0 || silent_ms > impl_->options.heartbeat_timeout.count()) {
        failures.push_back({held, fmt::format("no heartbeat at the market for {} ms", silent_ms)});
        continue;
      }
    }
    // Pipelined: the lease's previous voucher was acknowledged during the step (checked first),
    // then this step's voucher is sent without waiting, so a step costs signing and sending.
    try {
      impl_->client.pay_step_async(held.id, step, impl_->options.voucher_timeout);
    } catch (const PeerLostError& e) {
      failures.push_back({held, e.what()});
    } catch (const MarketError& e) {
      if (e.reason() == "spend_limit") {
        // The other leases are still paid for this step; the caller learns after.
        impl_->budget_exhausted = true;
        impl_->emit(FleetEvent::Kind::BudgetExhausted, held, e.what());
        budget_error = std::current_exception();
      } else if (e.reason() == "escrow_exhausted" || e.reason() == "lease_closed") {
        // Used up: release it normally; a fresh lease replaces it below.
        Lease closed = impl_->client.release(held.id, CloseReason::RenterDone);
        impl_->checked.erase(held.id);
        impl_->emit(FleetEvent::Kind::Released, closed, e.what());
      } else {
        failures.push_back({held, e.what()});
      }
    }
  }
  if (budget_error) std::rethrow_exception(budget_error);
  impl_->failed.clear();
  for (const auto& [lease, why] : failures) impl_->handle_failure(lease, why);
  bool replacing = !failures.empty();
  for (const Lease& l : impl_->top_up()) {
    impl_->emit(replacing ? FleetEvent::Kind::Replaced : FleetEvent::Kind::Leased, l, "");
    // A replacement joins from the next step: its first voucher comes then.
  }
  return impl_->client.leases();
}

std::vector<Lease> Fleet::leases() const { return impl_->client.leases(); }

void Fleet::release_all() {
  for (const Lease& l : impl_->client.leases()) {
    try {
      Lease closed = impl_->client.release(l.id, CloseReason::RenterDone);
      impl_->emit(FleetEvent::Kind::Released, closed, "fleet released");
    } catch (const Error& e) {
      impl_->client.forget(l.id);
      log::warn("market", "fleet: releasing lease {}: {}", l.id, e.what());
    }
  }
}

}  // namespace meshtrain::market
