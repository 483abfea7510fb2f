// The provider daemon (docs/market.md "Provider daemon").
#include "market/provider.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <variant>

#include "core/json.h"
#include "meshtrain/net.h"

extern char** environ;

namespace meshtrain::market {

// JSON: lib/core/json.h (meshtrain::json).
using std::chrono::milliseconds;

namespace {

constexpr std::string_view kLog = "provider";
// How long a voucher or attach for a lease we have never heard of may wait for the market
// thread's current call before it is answered "market_unavailable".
constexpr milliseconds kLookupWait{1500};
constexpr uint32_t kOfferSearchPages = 20;

bool market_unreachable(const std::exception& e) {
  return dynamic_cast<const TimeoutError*>(&e) || dynamic_cast<const PeerLostError*>(&e) ||
         dynamic_cast<const IoError*>(&e) || dynamic_cast<const CancelledError*>(&e);
}

std::string spec_digest(const OfferSpec& s) {
  std::string canonical = fmt::format("{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}", s.gpu.model, s.gpu.count,
                                      s.gpu.vram_gib, s.gpu.cuda_capability, s.price_per_step,
                                      s.price_per_hour_idle, s.region, s.endpoint, s.latency_hint_ms,
                                      s.hardware.text, crypto::to_hex(s.hardware.signature));
  auto d = crypto::sha256(crypto::ByteSpan(reinterpret_cast<const uint8_t*>(canonical.data()), canonical.size()));
  return crypto::to_hex(d);
}

// Renter-supplied text that ends up in a worker's environment.
bool printable(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x20 && c != 0x7f; });
}

}  // namespace

std::string voucher_rejection(const Lease& lease, const AccountId& provider, const AccountId& sender,
                              const Voucher& voucher, uint64_t latest_step, Amount latest_amount, TimeMs now_ms) {
  if (lease.provider != provider) return "not_my_lease";
  if (sender != lease.renter) return "wrong_sender";
  try {
    voucher.verify(lease.renter);
  } catch (const AuthError&) {
    return "bad_signature";
  }
  if (lease.state != LeaseState::Open) return "lease_closed";
  if (lease.expires_ms != 0 && now_ms >= lease.expires_ms) return "lease_expired";
  if (voucher.step <= latest_step || voucher.cumulative_amount <= latest_amount) return "stale_voucher";
  if (lease.price_per_step != 0 && voucher.step > UINT64_MAX / lease.price_per_step) return "amount_overflow";
  if (voucher.cumulative_amount != voucher.step * lease.price_per_step) return "wrong_increment";
  if (voucher.cumulative_amount > lease.escrow) return "over_escrow";
  return {};
}

// ---------------------------------------------------------------------------------------------

namespace {

struct LeaseEntry {
  Lease lease;
  std::optional<Voucher> latest;
  Clock::time_point last_payment;  // first seen, attach or latest voucher: starts the unpaid grace
  pid_t worker = 0;                // process group leader (== group id); 0: none
  bool worker_reaped = false;      // the leader exited; the group may still hold its children
  std::optional<Clock::time_point> stop_sent;
  bool finished = false;           // closed and settled as far as it can be: nothing more to do

  uint64_t latest_step() const { return std::max(lease.paid_step, latest ? latest->step : 0); }
  Amount latest_amount() const { return std::max(lease.paid, latest ? latest->cumulative_amount : 0); }
  bool unredeemed() const { return latest && latest->cumulative_amount > lease.paid; }
};

}  // namespace

struct Provider::Impl {
  Impl(const crypto::Identity& self_, MarketBackend& backend_, ProviderSettings settings_, DetectedHardware hw)
      : self(self_),
        backend(backend_),
        settings(std::move(settings_)),
        hardware(std::move(hw)),
        store(settings.db_path),
        server(self, net::AllowList{}, settings.bind_endpoint, server_options()) {
    spec.gpu = hardware.gpu;
    spec.price_per_step = settings.price_per_step;
    spec.price_per_hour_idle = settings.price_per_hour_idle;
    spec.region = settings.region;
    bound_endpoint = server.endpoint();
    spec.endpoint = settings.advertise_endpoint.empty() ? bound_endpoint : settings.advertise_endpoint;
    spec.latency_hint_ms = settings.latency_hint_ms;
    spec.hardware = HardwareReport::sign(self, hardware.report_json);
    digest = spec_digest(spec);
    auto now = Clock::now();
    for (Lease& l : store.leases()) {
      LeaseEntry e;
      e.latest = store.latest_voucher(l.id);
      e.last_payment = now;
      e.finished = l.state == LeaseState::Closed;
      e.lease = std::move(l);
      if (e.latest)
        log::info(kLog, "lease {}: restored latest voucher step {} amount {} (paid {})", e.lease.id, e.latest->step,
                  e.latest->cumulative_amount, e.lease.paid);
      leases.emplace(e.lease.id, std::move(e));
    }
  }

  static net::ControlOptions server_options() {
    net::ControlOptions o;
    o.admit_any_key = true;  // renters are not known in advance; each message names its sender
    o.limits.max_control_payload_bytes = protocol::kMaxRequestBytes;
    return o;
  }

  const crypto::Identity& self;
  MarketBackend& backend;
  ProviderSettings settings;
  DetectedHardware hardware;
  OfferSpec spec;
  std::string digest;

  std::timed_mutex market_mutex;  // one backend call at a time
  mutable std::mutex mutex;       // everything below
  ProviderStore store;
  std::map<Id, LeaseEntry> leases;
  Id offer_id = 0;
  bool market_up = false;
  bool market_ever_down = false;
  std::string market_error;
  milliseconds backoff{0};
  Clock::time_point next_market_try{};
  Clock::time_point next_heartbeat{}, next_poll{}, next_redeem{};
  std::set<Id> orders_seen;
  uint64_t vouchers_accepted = 0, vouchers_rejected = 0, bids_placed = 0;
  Amount redeemed_total = 0;

  net::ControlServer server;  // declared last: its thread (serve) uses the members above
  std::string bound_endpoint;  // server.endpoint(), read here because the server is single-threaded

  // Runs `f(backend)` holding the market lock.
  template <typename F>
  auto market(F&& f) {
    std::lock_guard<std::timed_mutex> lock(market_mutex);
    return f(backend);
  }

  // ---- leases --------------------------------------------------------------------------------

  // The lease, from the cache or (unknown so far) from the market. On failure returns the
  // reason word for the ack.
  std::variant<Lease, std::string> find_lease(Id lease_id) {
    {
      std::lock_guard lock(mutex);
      if (auto it = leases.find(lease_id); it != leases.end()) return it->second.lease;
    }
    std::unique_lock<std::timed_mutex> market_lock(market_mutex, std::defer_lock);
    if (!market_lock.try_lock_for(kLookupWait)) return std::string("market_unavailable");
    Lease lease;
    try {
      lease = backend.lease(lease_id);
    } catch (const MarketError& e) {
      log::info(kLog, "lease {} is unknown to the market: {}", lease_id, e.what());
      return std::string("unknown_lease");
    } catch (const std::exception& e) {
      log::warn(kLog, "cannot look up lease {} at the market: {}", lease_id, e.what());
      return std::string(market_unreachable(e) ? "market_unavailable" : "unknown_lease");
    }
    market_lock.unlock();
    if (lease.id != lease_id) return std::string("unknown_lease");
    if (lease.provider == self.public_key()) remember_lease(lease, Clock::now());
    return lease;
  }

  // Adds or refreshes a lease record; returns the entry. Caller must not hold `mutex`.
  void remember_lease(const Lease& lease, Clock::time_point now) {
    std::lock_guard lock(mutex);
    update_lease_locked(lease, now);
  }

  LeaseEntry& update_lease_locked(const Lease& lease, Clock::time_point now) {
    auto [it, inserted] = leases.try_emplace(lease.id);
    LeaseEntry& e = it->second;
    bool changed = inserted || e.lease.state != lease.state || e.lease.paid != lease.paid ||
                   e.lease.paid_step != lease.paid_step;
    if (inserted) {
      e.last_payment = now;
      e.latest = store.latest_voucher(lease.id);
      log::info(kLog, "lease {}: renter {} at {} per step, escrow {}, expires in {} s", lease.id,
                lease.renter.fingerprint(), lease.price_per_step, lease.escrow,
                std::max<TimeMs>(0, lease.expires_ms - wall_clock_ms()) / 1000);
    }
    if (!inserted && e.lease.state == LeaseState::Open && lease.state == LeaseState::Closed)
      log::info(kLog, "lease {}: closed ({}), paid {} for {} steps", lease.id, close_reason_name(lease.close_reason),
                lease.paid, lease.paid_step);
    e.lease = lease;
    if (changed) store.put_lease(lease);
    return e;
  }

  // ---- vouchers and attach -------------------------------------------------------------------

  protocol::VoucherAck handle_voucher(const AccountId& sender, const Voucher& v) {
    protocol::VoucherAck ack;
    auto found = find_lease(v.lease_id);
    std::lock_guard lock(mutex);
    if (auto* reason = std::get_if<std::string>(&found)) {
      ack.reason = *reason;
      ++vouchers_rejected;
      log::info(kLog, "refused voucher for lease {} step {} from {}: {}", v.lease_id, v.step, sender.fingerprint(),
                ack.reason);
      return ack;
    }
    const Lease& lease = std::get<Lease>(found);
    auto it = leases.find(v.lease_id);
    LeaseEntry* entry = it == leases.end() ? nullptr : &it->second;
    uint64_t latest_step = entry ? entry->latest_step() : lease.paid_step;
    Amount latest_amount = entry ? entry->latest_amount() : lease.paid;
    ack.reason = voucher_rejection(entry ? entry->lease : lease, self.public_key(), sender, v, latest_step,
                                   latest_amount, wall_clock_ms());
    if (ack.reason.empty()) {
      try {
        store.put_voucher(v);  // durable before the ack: an acknowledged voucher is never lost
        ack.accepted = true;
        entry->latest = v;
        entry->last_payment = Clock::now();
        latest_step = v.step;
        latest_amount = v.cumulative_amount;
        ++vouchers_accepted;
        log::debug(kLog, "lease {}: voucher step {} amount {} stored", v.lease_id, v.step, v.cumulative_amount);
      } catch (const Error& e) {
        ack.reason = "store_failed";
        log::error(kLog, "lease {}: cannot store voucher step {}: {}", v.lease_id, v.step, e.what());
      }
    }
    if (!ack.accepted) {
      ++vouchers_rejected;
      log::info(kLog, "refused voucher for lease {} step {} amount {} from {}: {}", v.lease_id, v.step,
                v.cumulative_amount, sender.fingerprint(), ack.reason);
    }
    ack.latest_step = latest_step;
    ack.latest_amount = latest_amount;
    return ack;
  }

  protocol::JobAttachAck handle_attach(const AccountId& sender, const protocol::JobAttach& a) {
    protocol::JobAttachAck ack;
    auto refuse = [&](std::string reason) {
      log::info(kLog, "refused job attach for lease {} from {}: {}", a.lease_id, sender.fingerprint(), reason);
      ack.reason = std::move(reason);
      return ack;
    };
    auto found = find_lease(a.lease_id);
    if (auto* reason = std::get_if<std::string>(&found)) return refuse(*reason);
    const Lease& lease = std::get<Lease>(found);
    if (lease.provider != self.public_key()) return refuse("not_my_lease");
    if (sender != lease.renter) return refuse("wrong_sender");
    if (lease.state != LeaseState::Open) return refuse("lease_closed");
    if (lease.expires_ms != 0 && wall_clock_ms() >= lease.expires_ms) return refuse("lease_expired");
    if (settings.worker_command.empty()) return refuse("no_worker_command");
    if (a.coordinator_endpoint.rfind("tcp://", 0) != 0 || !printable(a.coordinator_endpoint) ||
        !printable(a.join_token))
      return refuse("bad_attach");

    std::lock_guard lock(mutex);
    LeaseEntry& e = leases.at(a.lease_id);
    e.last_payment = Clock::now();
    if (e.worker != 0 && !e.worker_reaped && !e.stop_sent) {
      log::info(kLog, "lease {}: worker {} already running; attach repeated", a.lease_id, e.worker);
      ack.accepted = true;
      return ack;
    }
    try {
      e.worker = start_worker(a);
      e.worker_reaped = false;
      e.stop_sent.reset();
    } catch (const Error& err) {
      log::error(kLog, "lease {}: cannot start the worker: {}", a.lease_id, err.what());
      ack.reason = "worker_failed";
      return ack;
    }
    log::info(kLog, "lease {}: worker {} started for coordinator {} ({})", a.lease_id, e.worker,
              a.coordinator_endpoint, a.coordinator_key.fingerprint());
    ack.accepted = true;
    return ack;
  }

  pid_t start_worker(const protocol::JobAttach& a) {
    // Built before fork: the child of a threaded process may only make async-signal-safe calls.
    std::vector<std::string> env_storage;
    for (char** e = environ; e && *e; ++e) {
      std::string_view var = *e;
      if (var.rfind("MESHTRAIN_COORDINATOR", 0) == 0 || var.rfind("MESHTRAIN_JOIN_TOKEN=", 0) == 0 ||
          var.rfind("MESHTRAIN_LEASE_ID=", 0) == 0)
        continue;
      env_storage.emplace_back(var);
    }
    env_storage.push_back("MESHTRAIN_COORDINATOR=" + a.coordinator_endpoint);
    env_storage.push_back("MESHTRAIN_COORDINATOR_KEY=" + a.coordinator_key.hex());
    env_storage.push_back("MESHTRAIN_JOIN_TOKEN=" + a.join_token);
    env_storage.push_back(fmt::format("MESHTRAIN_LEASE_ID={}", a.lease_id));
    std::vector<char*> envp;
    for (auto& v : env_storage) envp.push_back(v.data());
    envp.push_back(nullptr);
    std::string sh = "/bin/sh", dash_c = "-c", command = settings.worker_command;
    char* argv[] = {sh.data(), dash_c.data(), command.data(), nullptr};

    pid_t pid = ::fork();
    if (pid < 0) throw_io_error("fork for the worker", errno);
    if (pid == 0) {
      ::setpgid(0, 0);  // its own group, so stopping it reaches the command's children too
      // The worker dies with the daemon (with the thread that forked it: the voucher server's,
      // which lives as long as the daemon serves); a restarted daemon waits for a new attach.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      ::execve(argv[0], argv, envp.data());
      _exit(127);
    }
    ::setpgid(pid, pid);  // also here, so the group exists before we might signal it
    return pid;
  }

  // ---- workers -------------------------------------------------------------------------------

  void stop_worker_locked(LeaseEntry& e, std::string_view why, Clock::time_point now) {
    if (e.worker == 0 || e.stop_sent) return;
    log::info(kLog, "lease {}: stopping worker {} ({})", e.lease.id, e.worker, why);
    ::kill(-e.worker, SIGTERM);
    e.stop_sent = now;
  }

  // Reaps exited workers, escalates to SIGKILL after the grace, forgets groups that are gone.
  void supervise_workers_locked(Clock::time_point now) {
    for (auto& [id, e] : leases) {
      if (e.worker == 0) continue;
      if (!e.worker_reaped) {
        int status = 0;
        pid_t r = ::waitpid(e.worker, &status, WNOHANG);
        if (r == e.worker) {
          e.worker_reaped = true;
          log::info(kLog, "lease {}: worker {} exited ({})", id, e.worker,
                    WIFEXITED(status) ? fmt::format("exit code {}", WEXITSTATUS(status))
                                      : fmt::format("signal {}", WTERMSIG(status)));
        }
      }
      bool group_alive = ::kill(-e.worker, 0) == 0;
      if (e.worker_reaped && !group_alive) {
        e.worker = 0;
        e.stop_sent.reset();
        continue;
      }
      if (e.stop_sent && now - *e.stop_sent >= settings.worker_stop_grace && group_alive) {
        log::warn(kLog, "lease {}: worker {} still running {} ms after SIGTERM; SIGKILL", id, e.worker,
                  settings.worker_stop_grace.count());
        ::kill(-e.worker, SIGKILL);
      }
    }
  }

  void stop_all_workers() {
    std::lock_guard lock(mutex);
    auto now = Clock::now();
    for (auto& [id, e] : leases) stop_worker_locked(e, "provider stopping", now);
    Deadline deadline = Deadline::after(settings.worker_stop_grace + milliseconds(2000));
    while (true) {
      auto t = Clock::now();
      supervise_workers_locked(t);
      bool any = std::any_of(leases.begin(), leases.end(), [](const auto& kv) { return kv.second.worker != 0; });
      if (!any) break;
      if (deadline.expired()) {
        for (auto& [id, e] : leases)
          if (e.worker != 0) log::error(kLog, "lease {}: worker {} did not stop", id, e.worker);
        break;
      }
      std::this_thread::sleep_for(milliseconds(20));
    }
  }

  // ---- market loop ---------------------------------------------------------------------------

  void ensure_offer() {
    {
      std::lock_guard lock(mutex);
      if (offer_id != 0) return;
    }
    std::optional<StoredOffer> stored;
    {
      std::lock_guard lock(mutex);
      stored = store.offer();
    }
    if (stored && stored->spec_digest == digest) {
      if (offer_still_active(stored->offer_id)) {
        std::lock_guard lock(mutex);
        offer_id = stored->offer_id;
        log::info(kLog, "re-using offer {} ({} x {} at {} per step)", offer_id, spec.gpu.count, spec.gpu.model,
                  spec.price_per_step);
        return;
      }
      log::info(kLog, "stored offer {} is no longer active; publishing a new one", stored->offer_id);
    } else if (stored) {
      log::info(kLog, "the offer changed since offer {} was published; withdrawing it", stored->offer_id);
      try {
        market([&](MarketBackend& b) { b.withdraw_offer(stored->offer_id); });
      } catch (const MarketError& e) {
        log::info(kLog, "withdrawing offer {}: {}", stored->offer_id, e.what());
      }
    }
    Id id = market([&](MarketBackend& b) { return b.offer(spec); });
    std::lock_guard lock(mutex);
    store.put_offer(StoredOffer{id, digest});
    offer_id = id;
    log::info(kLog, "published offer {}: {} x {} ({} GiB, compute {}) at {} per step, endpoint {}", id,
              spec.gpu.count, spec.gpu.model, spec.gpu.vram_gib, spec.gpu.cuda_capability, spec.price_per_step,
              spec.endpoint);
  }

  // A busy offer (open lease) is not listed by discover, so the open leases are asked first.
  bool offer_still_active(Id id) {
    LeaseQuery lq;
    lq.provider = self.public_key();
    lq.open_only = true;
    for (const Lease& l : market([&](MarketBackend& b) { return b.leases(lq); }))
      if (l.offer_id == id) return true;
    OfferFilter f;
    f.gpu_model = spec.gpu.model;
    f.alive_only = false;
    f.limit = protocol::kMaxPageSize;
    for (uint32_t page = 0; page < kOfferSearchPages; ++page) {
      OfferPage p = market([&](MarketBackend& b) { return b.discover(f); });
      for (const Offer& o : p.offers)
        if (o.id == id) return o.active && o.provider == self.public_key();
      if (p.next_page_token == 0) return false;
      f.page_token = p.next_page_token;
    }
    return false;
  }

  void refresh_leases(Clock::time_point now) {
    LeaseQuery q;
    q.provider = self.public_key();
    q.limit = protocol::kMaxPageSize;
    std::vector<Lease> fresh = market([&](MarketBackend& b) { return b.leases(q); });
    std::lock_guard lock(mutex);
    for (const Lease& l : fresh)
      if (l.provider == self.public_key()) update_lease_locked(l, now);
  }

  void bid_on_orders() {
    Id offer;
    {
      std::lock_guard lock(mutex);
      offer = offer_id;
      for (const auto& [id, e] : leases)
        if (e.lease.state == LeaseState::Open && e.lease.offer_id == offer) return;  // busy: one lease per offer
    }
    if (offer == 0) return;
    OrderQuery q;
    q.open_only = true;
    q.matching_offer = offer;
    std::vector<Order> open = market([&](MarketBackend& b) { return b.orders(q); });
    {
      // Forget orders that are no longer open, so the set stays as small as the order book.
      std::lock_guard lock(mutex);
      std::set<Id> still_open;
      for (const Order& o : open)
        if (orders_seen.count(o.id)) still_open.insert(o.id);
      orders_seen.swap(still_open);
    }
    for (const Order& o : open) {
      {
        std::lock_guard lock(mutex);
        if (!orders_seen.insert(o.id).second) continue;
      }
      if (spec.price_per_step > o.spec.max_price_per_step) {
        log::info(kLog, "order {}: max price {} is below our {}; no bid", o.id, o.spec.max_price_per_step,
                  spec.price_per_step);
        continue;
      }
      try {
        Id bid = market([&](MarketBackend& b) { return b.bid(o.id, offer, spec.price_per_step); });
        std::lock_guard lock(mutex);
        ++bids_placed;
        log::info(kLog, "order {} from {}: bid {} at {} per step", o.id, o.renter.fingerprint(), bid,
                  spec.price_per_step);
      } catch (const MarketError& e) {
        log::info(kLog, "order {}: bid refused: {}", o.id, e.what());
      }
    }
  }

  void apply_settlement(LeaseEntry& e, const Lease& after, Clock::time_point now, std::string_view how) {
    Amount before = e.lease.paid;
    update_lease_locked(after, now);
    if (after.paid > before) {
      redeemed_total += after.paid - before;
      log::info(kLog, "lease {}: {} paid {} (now {} for {} steps)", after.id, how, after.paid - before, after.paid,
                after.paid_step);
    }
  }

  // Redeems what is due. `force`: every lease with an unredeemed voucher, now.
  void redeem(Clock::time_point now, bool force) {
    bool interval_due = force || now >= next_redeem;
    if (interval_due) next_redeem = now + settings.redeem_interval;
    TimeMs near_expiry = wall_clock_ms() + 2 * std::max(settings.poll_interval, settings.heartbeat_interval).count();
    std::vector<Voucher> due;
    {
      std::lock_guard lock(mutex);
      for (auto& [id, e] : leases) {
        if (e.finished || !e.unredeemed()) continue;
        bool expiring = e.lease.expires_ms != 0 && e.lease.expires_ms <= near_expiry;
        if (interval_due || expiring || e.lease.state == LeaseState::Closed) due.push_back(*e.latest);
      }
    }
    for (const Voucher& v : due) {
      try {
        RedeemResult r = market([&](MarketBackend& b) { return b.redeem(v); });
        std::lock_guard lock(mutex);
        apply_settlement(leases.at(v.lease_id), r.lease, now, fmt::format("redeemed step {}:", v.step));
      } catch (const MarketError& e) {
        log::warn(kLog, "lease {}: redeeming step {} (amount {}) refused: {}", v.lease_id, v.step,
                  v.cumulative_amount, e.what());
        Lease l = market([&](MarketBackend& b) { return b.lease(v.lease_id); });
        std::lock_guard lock(mutex);
        LeaseEntry& entry = leases.at(v.lease_id);
        update_lease_locked(l, now);
        if (l.state == LeaseState::Closed) finish_locked(entry);
      }
    }
  }

  void finish_locked(LeaseEntry& e) {
    if (e.finished) return;
    e.finished = true;
    if (e.unredeemed())
      log::warn(kLog, "lease {}: closed with {} paid; our latest voucher (step {}, amount {}) can no longer be "
                "redeemed", e.lease.id, e.lease.paid, e.latest->step, e.latest->cumulative_amount);
  }

  // Closes the leases whose renter sent nothing within the unpaid grace.
  void enforce_payment(Clock::time_point now) {
    std::vector<std::pair<Id, std::optional<Voucher>>> overdue;
    {
      std::lock_guard lock(mutex);
      for (auto& [id, e] : leases) {
        if (e.lease.state != LeaseState::Open || now - e.last_payment <= settings.unpaid_grace) continue;
        log::warn(kLog, "lease {}: renter {} sent no voucher for {} ms (grace {} ms); closing the lease", id,
                  e.lease.renter.fingerprint(),
                  std::chrono::duration_cast<milliseconds>(now - e.last_payment).count(),
                  settings.unpaid_grace.count());
        overdue.emplace_back(id, e.unredeemed() ? e.latest : std::nullopt);
      }
    }
    for (auto& [id, voucher] : overdue) {
      Lease after;
      try {
        after = market([&](MarketBackend& b) { return b.close(id, CloseReason::ProviderDone, voucher); });
      } catch (const MarketError& e) {
        log::warn(kLog, "lease {}: close refused: {}", id, e.what());
        after = market([&](MarketBackend& b) { return b.lease(id); });
      }
      std::lock_guard lock(mutex);
      LeaseEntry& e = leases.at(id);
      apply_settlement(e, after, now, "closed for non-payment;");
      stop_worker_locked(e, "renter stopped paying", now);
    }
  }

  // Stops workers of leases that are over; finishes closed leases.
  void retire_leases_locked(Clock::time_point now) {
    TimeMs now_ms = wall_clock_ms();
    for (auto& [id, e] : leases) {
      bool closed = e.lease.state == LeaseState::Closed;
      bool expired = e.lease.expires_ms != 0 && now_ms >= e.lease.expires_ms;
      if (closed || expired) stop_worker_locked(e, closed ? "lease closed" : "lease expired", now);
      if (closed && !e.unredeemed()) e.finished = true;
    }
  }

  void market_tick(Clock::time_point now) {
    bool try_market = now >= next_market_try;
    if (try_market) {
      try {
        ensure_offer();
        if (now >= next_heartbeat) {
          market([](MarketBackend& b) { b.heartbeat(); });
          next_heartbeat = now + settings.heartbeat_interval;
        }
        if (now >= next_poll) {
          refresh_leases(now);
          bid_on_orders();
          next_poll = now + settings.poll_interval;
        }
        redeem(now, false);
        enforce_payment(now);
        std::lock_guard lock(mutex);
        if (!market_up) log::info(kLog, "market reachable{}", market_ever_down ? " again" : "");
        market_up = true;
        market_error.clear();
        backoff = milliseconds(0);
      } catch (const std::exception& e) {
        std::lock_guard lock(mutex);
        // Unreachable or refusing (e.g. an offer the market will not take): either way the
        // next try waits, so a persistent failure does not turn into a busy loop of requests.
        backoff = std::min(settings.max_backoff, std::max(settings.heartbeat_interval, backoff * 2));
        next_market_try = now + backoff;
        if (market_unreachable(e)) {
          if (market_up || market_error.empty())
            log::warn(kLog, "market unreachable ({}); vouchers are still accepted and stored; retrying in {} ms",
                      e.what(), backoff.count());
          else
            log::info(kLog, "market still unreachable ({}); retrying in {} ms", e.what(), backoff.count());
          market_up = false;
          market_ever_down = true;
        } else {
          log::error(kLog, "market call failed: {}; retrying in {} ms", e.what(), backoff.count());
        }
        market_error = e.what();
      }
    }
    std::lock_guard lock(mutex);
    retire_leases_locked(now);
    supervise_workers_locked(now);
  }

  // ---- voucher server ------------------------------------------------------------------------

  void serve(Deadline deadline, const CancelToken* cancel) {
    while (!deadline.expired()) {
      std::optional<net::Message> m = server.recv(deadline, cancel);
      if (!m) return;
      const AccountId& sender = m->header.sender;
      net::MessageHeader reply;
      reply.op_seq = m->header.op_seq;
      std::vector<uint8_t> payload;
      std::string source = fmt::format("message from {}", sender.fingerprint());
      switch (static_cast<protocol::MessageType>(m->header.type)) {
        case protocol::MessageType::VoucherDelivery: {
          protocol::VoucherAck ack;
          try {
            ack = handle_voucher(sender, protocol::decode_voucher(m->payload, source));
          } catch (const Error& e) {
            log::info(kLog, "malformed voucher: {}", e.what());
            ack.reason = "malformed";
            std::lock_guard lock(mutex);
            ++vouchers_rejected;
          }
          reply.type = static_cast<uint16_t>(protocol::MessageType::VoucherAck);
          payload = protocol::encode(ack);
          break;
        }
        case protocol::MessageType::JobAttach: {
          protocol::JobAttachAck ack;
          try {
            ack = handle_attach(sender, protocol::decode_job_attach(m->payload, source));
          } catch (const Error& e) {
            log::info(kLog, "malformed job attach: {}", e.what());
            ack.reason = "malformed";
          }
          reply.type = static_cast<uint16_t>(protocol::MessageType::JobAttachAck);
          payload = protocol::encode(ack);
          break;
        }
        default:
          log::debug(kLog, "ignoring message type {} from {}", m->header.type, sender.fingerprint());
          continue;
      }
      try {
        server.send(sender, reply, payload);
      } catch (const PeerLostError& e) {
        log::info(kLog, "cannot answer {}: {}", sender.fingerprint(), e.what());
      }
    }
  }

  ProviderStatus status() const {
    std::lock_guard lock(mutex);
    ProviderStatus s;
    s.endpoint = bound_endpoint;
    s.provider = self.public_key();
    s.offer_id = offer_id;
    s.market_up = market_up;
    s.market_error = market_error;
    s.vouchers_accepted = vouchers_accepted;
    s.vouchers_rejected = vouchers_rejected;
    s.bids_placed = bids_placed;
    s.redeemed_total = redeemed_total;
    for (const auto& [id, e] : leases) {
      if (e.finished && e.worker == 0) continue;
      ProviderLeaseStatus l;
      l.lease = e.lease;
      l.latest_step = e.latest_step();
      l.latest_amount = e.latest_amount();
      l.worker_pid = e.worker_reaped ? 0 : e.worker;
      s.leases.push_back(std::move(l));
    }
    return s;
  }
};

// ---------------------------------------------------------------------------------------------

std::string ProviderStatus::to_json() const {
  json::Writer w(false);
  w.begin_object();
  w.key("endpoint").value(endpoint).key("provider").value(provider.hex()).key("offer_id").value(offer_id);
  w.key("market_up").value(market_up).key("market_error").value(market_error);
  w.key("vouchers_accepted").value(vouchers_accepted).key("vouchers_rejected").value(vouchers_rejected);
  w.key("bids_placed").value(bids_placed).key("redeemed_total").value(redeemed_total);
  w.key("leases").begin_array();
  for (const auto& l : leases) {
    w.begin_object();
    w.key("id").value(l.lease.id).key("renter").value(l.lease.renter.hex());
    w.key("state").value(lease_state_name(l.lease.state)).key("close_reason").value(close_reason_name(l.lease.close_reason));
    w.key("price_per_step").value(l.lease.price_per_step).key("escrow").value(l.lease.escrow);
    w.key("latest_step").value(l.latest_step).key("latest_amount").value(l.latest_amount);
    w.key("paid").value(l.lease.paid).key("paid_step").value(l.lease.paid_step);
    w.key("expires_ms").value(l.lease.expires_ms).key("worker_pid").value(static_cast<int64_t>(l.worker_pid));
    w.end_object();
  }
  w.end_array();
  w.end_object();
  return w.take();
}

std::string ProviderStatus::to_text() const {
  std::string out = fmt::format("offer {} market {} vouchers {} accepted / {} refused, bids {}, redeemed {}",
                                offer_id, market_up ? "up" : "DOWN", vouchers_accepted, vouchers_rejected,
                                bids_placed, redeemed_total);
  for (const auto& l : leases)
    out += fmt::format("; lease {} {} step {} amount {} paid {} worker {}", l.lease.id,
                       lease_state_name(l.lease.state), l.latest_step, l.latest_amount, l.lease.paid,
                       l.worker_pid ? std::to_string(l.worker_pid) : std::string("-"));
  return out;
}

Provider::Provider(const crypto::Identity& self, MarketBackend& backend, ProviderSettings settings,
                   DetectedHardware hardware)
    : impl_(std::make_unique<Impl>(self, backend, std::move(settings), std::move(hardware))) {}

Provider::~Provider() { impl_->stop_all_workers(); }

std::string Provider::endpoint() const { return impl_->bound_endpoint; }
const OfferSpec& Provider::offer_spec() const { return impl_->spec; }
ProviderStatus Provider::status() const { return impl_->status(); }

protocol::VoucherAck Provider::handle_voucher(const AccountId& sender, const Voucher& voucher) {
  return impl_->handle_voucher(sender, voucher);
}
protocol::JobAttachAck Provider::handle_attach(const AccountId& sender, const protocol::JobAttach& attach) {
  return impl_->handle_attach(sender, attach);
}
void Provider::serve(Deadline deadline, const CancelToken* cancel) { impl_->serve(deadline, cancel); }
void Provider::market_tick(Clock::time_point now) { impl_->market_tick(now); }

void Provider::run(const CancelToken& stop, const std::function<void(const ProviderStatus&)>& on_interval) {
  std::thread server_thread([&] {
    while (!stop.cancelled()) {
      try {
        impl_->serve(Deadline::after(milliseconds(500)), &stop);
      } catch (const CancelledError&) {
        break;
      } catch (const std::exception& e) {
        log::error(kLog, "voucher server: {}", e.what());
      }
    }
  });
  Clock::time_point next_status{};
  while (!stop.cancelled()) {
    auto now = Clock::now();
    impl_->market_tick(now);
    if (on_interval && now >= next_status) {
      on_interval(impl_->status());
      next_status = now + impl_->settings.heartbeat_interval;
    }
    pollfd p{stop.fd(), POLLIN, 0};
    ::poll(&p, 1, 100);
  }
  server_thread.join();
  // Leaving: settle what can be settled now (a market that is down keeps the vouchers for the
  // next start), then stop the workers.
  try {
    impl_->redeem(Clock::now(), true);
  } catch (const std::exception& e) {
    log::warn(kLog, "last redemption before stopping failed: {} (the vouchers stay stored for the next start)",
              e.what());
  }
  impl_->stop_all_workers();
}

}  // namespace meshtrain::market
