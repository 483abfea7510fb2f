// MarketClient: the renter's side of leasing and per-step payment.
//
// The budget is enforced at signing: a voucher is counted as spent the moment it is signed
// (the provider may hold it even if the acknowledgement is lost), and no voucher is signed that
// would take the total over spend_limit or a lease over its escrow.
#include <algorithm>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "market/protocol.h"
#include "meshtrain/market.h"
#include "meshtrain/net.h"

namespace meshtrain::market {
namespace {

// a * b, or MarketError("amount_overflow").
Amount checked_mul(Amount a, uint64_t b, std::string_view what) {
  if (b != 0 && a > UINT64_MAX / b)
    throw MarketError("amount_overflow", fmt::format("{}: {} x {} overflows 64 bits", what, a, b));
  return a * b;
}

uint64_t random_nonce() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

}  // namespace

struct MarketClient::Impl {
  Impl(const crypto::Identity& s, MarketBackend& b, Budget bu) : self(s), backend(b), budget(bu) {}

  struct Book {
    Lease lease;
    std::optional<Voucher> latest;
    uint64_t last_job_step = 0;  // job step of the latest voucher (meaningful once latest is set)
    // The link to the provider's daemon, opened on first use. Guarded by link_mutex (not the
    // client's mutex), so payments to different providers wait for their acks in parallel.
    std::mutex link_mutex;
    std::unique_ptr<net::ControlClient> daemon;
    uint64_t request_id = 0;
    std::optional<std::pair<uint64_t, Voucher>> unconfirmed;  // sent, acknowledgement not yet read
  };

  const crypto::Identity& self;
  MarketBackend& backend;
  Budget budget;
  mutable std::mutex mutex;
  std::map<Id, Book> books;
  Spend spend;

  Book& book(Id lease_id) {
    auto it = books.find(lease_id);
    if (it == books.end())
      throw InvalidArgumentError(fmt::format("lease {} is not held by this client (rent it first)", lease_id));
    return it->second;
  }

  std::string provider_name(const Book& b) const {
    return fmt::format("provider {} (lease {}, {})", b.lease.provider.fingerprint(), b.lease.id, b.lease.endpoint);
  }

  net::ControlClient& daemon(Book& b) {
    if (!b.daemon) {
      net::ControlOptions options;
      options.heartbeat_interval = std::chrono::milliseconds(1000);
      b.daemon = std::make_unique<net::ControlClient>(self, b.lease.provider, b.lease.endpoint, options);
    }
    return *b.daemon;
  }

  // Sends one message to the provider's daemon and waits for the reply of type `reply_type`
  // with the same request id. PeerLostError when none arrives in time.
  // Sends one message to the provider's daemon; returns its request id. PeerLostError when it
  // cannot even be queued.
  uint64_t send_to_daemon(Book& b, protocol::MessageType type, const std::vector<uint8_t>& payload) {
    net::MessageHeader header;
    header.type = static_cast<uint16_t>(type);
    header.op_seq = ++b.request_id;
    try {
      daemon(b).send(header, payload);
    } catch (const TimeoutError& e) {
      b.daemon.reset();
      throw PeerLostError(b.lease.provider.fingerprint(),
                          fmt::format("{}: cannot send: {}", provider_name(b), e.what()));
    }
    return header.op_seq;
  }

  // Waits for the daemon's reply of type `reply_type` to request `id`. PeerLostError when none
  // arrives within `timeout`.
  net::Message await_daemon(Book& b, protocol::MessageType reply_type, uint64_t id, std::chrono::milliseconds timeout) {
    Deadline deadline = Deadline::after(timeout);
    try {
      for (;;) {
        net::Message m = daemon(b).recv(deadline);
        if (m.header.type == static_cast<uint16_t>(reply_type) && m.header.op_seq == id) return m;
      }
    } catch (const TimeoutError& e) {
      // A dead daemon's connection is useless; a fresh one is opened on the next call.
      b.daemon.reset();
      throw PeerLostError(b.lease.provider.fingerprint(),
                          fmt::format("{} did not answer within {} ms: {}", provider_name(b), timeout.count(), e.what()));
    }
  }

  // Waits for the acknowledgement of the voucher last sent on `b`, if any. Caller holds link_mutex.
  void confirm(Book& b, std::chrono::milliseconds timeout) {
    if (!b.unconfirmed) return;
    auto [id, v] = *b.unconfirmed;
    b.unconfirmed.reset();
    net::Message m = await_daemon(b, protocol::MessageType::VoucherAck, id, timeout);
    protocol::VoucherAck ack;
    try {
      ack = protocol::decode_voucher_ack(m.payload, provider_name(b));
    } catch (const ProtocolError& e) {
      // The provider's fault, like silence: reported as its loss, so that a Fleet replaces it
      // (a ProtocolError would fail the caller's step for every lease, step after step).
      b.daemon.reset();
      throw PeerLostError(b.lease.provider.fingerprint(),
                          fmt::format("{} sent a malformed voucher acknowledgement: {}", provider_name(b), e.what()));
    }
    // A resend the daemon already stored is as good as accepted.
    if (!ack.accepted && !(ack.latest_step == v.step && ack.latest_amount == v.cumulative_amount))
      throw MarketError(ack.reason.empty() ? "voucher_refused" : ack.reason,
                        fmt::format("{} refused the voucher for step {} ({}): {}", provider_name(b), v.step,
                                    v.cumulative_amount, ack.reason));
  }
};

MarketClient::MarketClient(const crypto::Identity& self, MarketBackend& backend, Budget budget)
    : impl_(std::make_unique<Impl>(self, backend, budget)) {
  if (budget.spend_limit == 0) throw InvalidArgumentError("market client: budget.spend_limit must be above 0");
  if (budget.escrow_per_lease == 0) throw InvalidArgumentError("market client: budget.escrow_per_lease must be above 0");
}

MarketClient::~MarketClient() = default;

OfferPage MarketClient::discover(const OfferFilter& filter) { return impl_->backend.discover(filter); }

std::vector<Lease> MarketClient::rent(uint32_t count, const OfferFilter& filter, std::chrono::milliseconds wait) {
  if (count == 0) return {};
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->spend.total >= impl_->budget.spend_limit)
      throw MarketError("spend_limit", fmt::format("renting {} lease(s): the budget of {} is spent", count,
                                                   impl_->budget.spend_limit));
  }
  OrderSpec spec;
  spec.filter = filter;
  spec.count = count;
  spec.max_price_per_step =
      impl_->budget.max_price_per_step != 0 ? impl_->budget.max_price_per_step : impl_->budget.escrow_per_lease;
  if (filter.max_price_per_step != 0 && (spec.max_price_per_step == 0 || filter.max_price_per_step < spec.max_price_per_step))
    spec.max_price_per_step = filter.max_price_per_step;
  spec.escrow_per_lease = impl_->budget.escrow_per_lease;
  spec.lease_duration_s = impl_->budget.lease_duration_s;
  Id order_id = impl_->backend.order(spec);
  log::info("market", "order {}: {} lease(s) of {} at most {} per step, escrow {} each", order_id, count,
            filter.gpu_model.empty() ? "any GPU" : filter.gpu_model, spec.max_price_per_step, spec.escrow_per_lease);

  // Collect bids until there are enough or the wait is over.
  Deadline deadline = Deadline::after(wait);
  std::vector<Bid> open;
  for (;;) {
    open.clear();
    for (const Bid& b : impl_->backend.bids(order_id))
      if (b.state == BidState::Open) open.push_back(b);
    if (open.size() >= count || deadline.expired()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Cheapest first, then the better reputation, then the older bid.
  std::map<AccountId, double> score;
  for (const Bid& b : open)
    if (!score.count(b.provider)) score[b.provider] = impl_->backend.reputation(b.provider).score;
  std::sort(open.begin(), open.end(), [&](const Bid& a, const Bid& b) {
    if (a.price_per_step != b.price_per_step) return a.price_per_step < b.price_per_step;
    if (score[a.provider] != score[b.provider]) return score[a.provider] > score[b.provider];
    return a.id < b.id;
  });
  std::vector<Lease> leased;
  for (const Bid& b : open) {
    if (leased.size() == count) break;
    try {
      Lease lease = impl_->backend.accept(b.id);
      std::lock_guard lock(impl_->mutex);
      impl_->books[lease.id].lease = lease;
      leased.push_back(lease);
      log::info("market", "lease {}: provider {} at {} per step, escrow {}", lease.id, lease.provider.fingerprint(),
                lease.price_per_step, lease.escrow);
    } catch (const MarketError& e) {
      // The bid went stale between listing and accepting (offer busy, withdrawn): try the next.
      log::info("market", "order {}: bid {} not accepted: {}", order_id, b.id, e.what());
    }
  }
  if (leased.size() < count) {
    log::warn("market", "order {}: {} of {} lease(s) after {} ms of bidding", order_id, leased.size(), count,
              wait.count());
    try {
      impl_->backend.cancel_order(order_id);
    } catch (const MarketError&) {
      // Already filled or cancelled: nothing more can be accepted on it either way.
    }
  }
  return leased;
}

Voucher MarketClient::pay_step(Id lease_id, uint64_t step, std::chrono::milliseconds timeout) {
  Voucher v = pay_step_async(lease_id, step, timeout);
  confirm(lease_id, timeout);
  return v;
}

Voucher MarketClient::pay_step_async(Id lease_id, uint64_t step, std::chrono::milliseconds timeout) {
  std::lock_guard lock(impl_->mutex);
  auto& b = impl_->book(lease_id);
  std::lock_guard link_lock(b.link_mutex);
  // The previous voucher first: a provider that did not take it gets no new one.
  impl_->confirm(b, timeout);
  if (b.lease.state != LeaseState::Open)
    throw MarketError("lease_closed", fmt::format("paying step {} on lease {}: the lease is closed", step, lease_id));
  if (b.latest && step <= b.last_job_step)
    throw InvalidArgumentError(fmt::format("paying step {} on lease {}: step {} is already paid", step, lease_id,
                                           b.last_job_step));
  uint64_t lease_step = b.latest ? b.latest->step + 1 : 1;
  Amount price = b.lease.price_per_step;
  Amount cumulative = checked_mul(price, lease_step, fmt::format("lease {} voucher", lease_id));
  if (impl_->spend.total + price > impl_->budget.spend_limit || impl_->spend.total + price < impl_->spend.total)
    throw MarketError("spend_limit", fmt::format("paying step {} on lease {}: {} spent + {} would exceed the limit {}",
                                                 step, lease_id, impl_->spend.total, price,
                                                 impl_->budget.spend_limit));
  if (cumulative > b.lease.escrow)
    throw MarketError("escrow_exhausted", fmt::format("paying step {} on lease {}: {} would exceed the escrow {}",
                                                      step, lease_id, cumulative, b.lease.escrow));
  Voucher v = Voucher::sign(impl_->self, lease_id, lease_step, cumulative, random_nonce());
  // Spent from here on: the provider may hold the voucher even if its acknowledgement is lost.
  b.latest = v;
  b.last_job_step = step;
  impl_->spend.total += price;
  impl_->spend.steps_paid += 1;
  uint64_t id = impl_->send_to_daemon(b, protocol::MessageType::VoucherDelivery, protocol::encode(v));
  b.unconfirmed = std::make_pair(id, v);
  return v;
}

void MarketClient::confirm(Id lease_id, std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mutex);
  auto& b = impl_->book(lease_id);
  std::unique_lock link_lock(b.link_mutex);
  lock.unlock();
  impl_->confirm(b, timeout);
}

Lease MarketClient::release(Id lease_id, CloseReason reason) {
  std::optional<Voucher> latest;
  {
    std::lock_guard lock(impl_->mutex);
    latest = impl_->book(lease_id).latest;
  }
  Lease closed = impl_->backend.close(lease_id, reason, latest);
  forget(lease_id);
  log::info("market", "lease {} closed ({}): paid {} of escrow {}", lease_id, close_reason_name(reason), closed.paid,
            closed.escrow);
  return closed;
}

void MarketClient::attach_job(Id lease_id, const std::string& coordinator_endpoint, const AccountId& coordinator_key,
                              const std::string& join_token, std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mutex);
  auto& b = impl_->book(lease_id);
  std::unique_lock link_lock(b.link_mutex);
  lock.unlock();
  protocol::JobAttach attach{lease_id, coordinator_endpoint, coordinator_key, join_token};
  uint64_t id = impl_->send_to_daemon(b, protocol::MessageType::JobAttach, protocol::encode(attach));
  net::Message m = impl_->await_daemon(b, protocol::MessageType::JobAttachAck, id, timeout);
  auto ack = protocol::decode_job_attach_ack(m.payload, impl_->provider_name(b));
  if (!ack.accepted)
    throw MarketError(ack.reason.empty() ? "attach_refused" : ack.reason,
                      fmt::format("{} refused to attach a worker: {}", impl_->provider_name(b), ack.reason));
}

void MarketClient::forget(Id lease_id) {
  std::lock_guard lock(impl_->mutex);
  if (auto it = impl_->books.find(lease_id); it != impl_->books.end()) {
    // A payment still waiting for its ack ends first. The link lock is released before the
    // book (and its mutex) is destroyed; nobody takes it again meanwhile, since every taker
    // finds the book under `mutex`, held here throughout.
    { std::lock_guard in_flight(it->second.link_mutex); }
    impl_->books.erase(it);
  }
}

std::vector<Lease> MarketClient::leases() const {
  std::lock_guard lock(impl_->mutex);
  std::vector<Lease> out;
  for (const auto& [id, b] : impl_->books) out.push_back(b.lease);
  return out;
}

std::optional<Voucher> MarketClient::latest_voucher(Id lease_id) const {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->books.find(lease_id);
  if (it == impl_->books.end()) return std::nullopt;
  return it->second.latest;
}

Spend MarketClient::spend() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->spend;
}

const Budget& MarketClient::budget() const { return impl_->budget; }

}  // namespace meshtrain::market
