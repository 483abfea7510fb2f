// MarketBackend over the control transport to `meshtrain-market` (the devnet market).
//
// Each call is one signed request and one reply matched by request id (op_seq). After a
// timeout the same bytes (same nonce) are sent again: the ledger answers a repeated request with
// the reply it stored the first time, so a retry never applies anything twice, even across a
// market restart.
#include <chrono>
#include <mutex>

#include "market/protocol.h"
#include "meshtrain/market.h"
#include "meshtrain/net.h"

namespace meshtrain::market {
namespace {

using protocol::Reply;
using protocol::Request;

class DevnetBackend final : public MarketBackend {
 public:
  DevnetBackend(const crypto::Identity& self, const AccountId& market_key, const std::string& endpoint,
                DevnetOptions options)
      : self_(self),
        name_(fmt::format("market {} at {}", market_key.fingerprint(), endpoint)),
        options_(options),
        client_(self, market_key, endpoint) {}

  Account mint(const AccountId& to, Amount amount) override {
    return expect<Account>(call(protocol::Mint{to, amount}), "mint");
  }
  Account account(const AccountId& who) override {
    return expect<Account>(call(protocol::AccountQuery{who}), "account");
  }
  Id offer(const OfferSpec& spec) override { return expect<Id>(call(spec), "offer"); }
  void withdraw_offer(Id offer_id) override { call(protocol::WithdrawOffer{offer_id}); }
  Id bid(Id order_id, Id offer_id, Amount price_per_step) override {
    return expect<Id>(call(protocol::PlaceBid{order_id, offer_id, price_per_step}), "bid");
  }
  void heartbeat() override { call(protocol::Heartbeat{}); }
  RedeemResult redeem(const Voucher& voucher) override {
    return expect<RedeemResult>(call(protocol::Redeem{voucher}), "redeem");
  }
  OfferPage discover(const OfferFilter& filter) override {
    return expect<OfferPage>(call(protocol::Discover{filter}), "discover");
  }
  Id order(const OrderSpec& spec) override { return expect<Id>(call(protocol::PlaceOrder{spec}), "order"); }
  void cancel_order(Id order_id) override { call(protocol::CancelOrder{order_id}); }
  std::vector<Bid> bids(Id order_id) override {
    return expect<std::vector<Bid>>(call(protocol::BidsQuery{order_id}), "bids");
  }
  Lease accept(Id bid_id) override { return expect<Lease>(call(protocol::Accept{bid_id}), "accept"); }
  Lease close(Id lease_id, CloseReason reason, const std::optional<Voucher>& final_voucher) override {
    return expect<Lease>(call(protocol::Close{lease_id, reason, final_voucher}), "close");
  }
  std::vector<Order> orders(const OrderQuery& query) override {
    return expect<std::vector<Order>>(call(query), "orders");
  }
  std::vector<Lease> leases(const LeaseQuery& query) override {
    return expect<std::vector<Lease>>(call(query), "leases");
  }
  Lease lease(Id lease_id) override { return expect<Lease>(call(protocol::LeaseLookup{lease_id}), "lease"); }
  Reputation reputation(const AccountId& provider) override {
    return expect<Reputation>(call(protocol::ReputationQuery{provider}), "reputation");
  }

 private:
  template <typename T>
  T expect(Reply reply, std::string_view what) {
    if (auto* value = std::get_if<T>(&reply.body)) return std::move(*value);
    throw ProtocolError(fmt::format("{}: reply to '{}' has the wrong kind of body", name_, what));
  }

  // A nonce above every earlier one of this process: the clock in nanoseconds, bumped when two
  // requests land in the same tick.
  uint64_t next_nonce() {
    auto now = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count());
    last_nonce_ = std::max(now, last_nonce_ + 1);
    return last_nonce_;
  }

  Reply call(protocol::Body body) {
    std::lock_guard lock(mutex_);
    Request request{self_.public_key(), protocol::changes_state(body) ? next_nonce() : 0, std::move(body)};
    std::string_view what = protocol::request_name(request.body);
    std::vector<uint8_t> bytes = protocol::encode_signed(request, self_);
    net::MessageHeader header;
    header.type = static_cast<uint16_t>(protocol::MessageType::Request);
    header.op_seq = ++request_id_;
    for (uint32_t attempt = 0;; ++attempt) {
      Deadline deadline = Deadline::after(options_.request_timeout);
      try {
        client_.send(header, bytes);
        for (;;) {
          net::Message m = client_.recv(deadline);
          if (m.header.type != static_cast<uint16_t>(protocol::MessageType::Reply) ||
              m.header.op_seq != header.op_seq) {
            log::debug("market", "{}: dropping a stale or unexpected message (type {}, request {})", name_,
                       m.header.type, m.header.op_seq);
            continue;
          }
          Reply reply = protocol::decode_reply(m.payload, name_);
          if (!reply.ok) protocol::throw_reply_error(reply, fmt::format("{} refused '{}'", name_, what));
          return reply;
        }
      } catch (const TimeoutError&) {
        if (attempt >= options_.retries)
          throw TimeoutError(fmt::format("{}: no reply to '{}' after {} attempts of {} ms", name_, what, attempt + 1,
                                         options_.request_timeout.count()));
        log::info("market", "{}: no reply to '{}' within {} ms, sending it again", name_, what,
                  options_.request_timeout.count());
      }
    }
  }

  const crypto::Identity& self_;
  std::string name_;
  DevnetOptions options_;
  std::mutex mutex_;
  net::ControlClient client_;
  uint64_t request_id_ = 0;
  uint64_t last_nonce_ = 0;
};

}  // namespace

std::unique_ptr<MarketBackend> connect_devnet(const crypto::Identity& self, const AccountId& market_key,
                                              const std::string& endpoint, DevnetOptions options) {
  return std::make_unique<DevnetBackend>(self, market_key, endpoint, options);
}

}  // namespace meshtrain::market
