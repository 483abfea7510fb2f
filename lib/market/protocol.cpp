// Cap'n Proto encoding of the market protocol (lib/wire/market.capnp). Decoders check every
// size and range here, so the ledger and the provider daemon only see well-formed values.
#include "market/protocol.h"

#include <cstring>
#include <type_traits>

#include "market.capnp.h"
#include "wire/capnp_io.h"

namespace meshtrain::market::protocol {
namespace {

using wire::data_of;
using wire::key_of;
using wire::signature_of;

constexpr wire::ReadLimits kRequestLimits{(kMaxRequestBytes / 8) * 2, 8};
constexpr wire::ReadLimits kReplyLimits{(kMaxReplyBytes / 8) * 2, 8};

// Decoding context: the source for error messages, and range checks.
struct In {
  std::string_view source;

  std::string text(capnp::Text::Reader t, std::string_view field) const {
    return wire::text_of(t, kMaxTextBytes, field, source);
  }
  template <typename Enum>
  Enum enumeration(uint8_t raw, Enum last, std::string_view field) const {
    if (raw > static_cast<uint8_t>(last))
      throw ProtocolError(fmt::format("{}: field '{}' has value {} (largest known {})", source, field, raw,
                                      static_cast<unsigned>(last)));
    return static_cast<Enum>(raw);
  }
  template <typename List>
  void bounded(const List& list, std::string_view field) const {
    if (list.size() > kMaxPageSize)
      throw ProtocolError(fmt::format("{}: field '{}' has {} entries (limit {})", source, field, list.size(),
                                      kMaxPageSize));
  }
};

// --- records -----------------------------------------------------------------------------------

void put(wire::GpuSpec::Builder b, const GpuSpec& v) {
  b.setModel(v.model);
  b.setCount(v.count);
  b.setVramGib(v.vram_gib);
  b.setCudaCapability(v.cuda_capability);
}
GpuSpec get(wire::GpuSpec::Reader r, const In& in) {
  return {in.text(r.getModel(), "gpu.model"), r.getCount(), r.getVramGib(),
          in.text(r.getCudaCapability(), "gpu.cudaCapability")};
}

void put(wire::OfferSpec::Builder b, const OfferSpec& v) {
  put(b.initGpu(), v.gpu);
  b.setPricePerStep(v.price_per_step);
  b.setPricePerHourIdle(v.price_per_hour_idle);
  b.setRegion(v.region);
  b.setEndpoint(v.endpoint);
  b.setLatencyHintMs(v.latency_hint_ms);
  auto hw = b.initHardware();
  hw.setText(v.hardware.text);
  hw.setSignature(data_of(v.hardware.signature));
}
OfferSpec get(wire::OfferSpec::Reader r, const In& in) {
  OfferSpec v;
  v.gpu = get(r.getGpu(), in);
  v.price_per_step = r.getPricePerStep();
  v.price_per_hour_idle = r.getPricePerHourIdle();
  v.region = in.text(r.getRegion(), "region");
  v.endpoint = in.text(r.getEndpoint(), "endpoint");
  v.latency_hint_ms = r.getLatencyHintMs();
  v.hardware.text = in.text(r.getHardware().getText(), "hardware.text");
  v.hardware.signature = signature_of(r.getHardware().getSignature(), "hardware.signature", in.source);
  return v;
}

void put(wire::Reputation::Builder b, const Reputation& v) {
  b.setCompletedSteps(v.completed_steps);
  b.setLeasesClean(v.leases_clean);
  b.setLeasesAbandoned(v.leases_abandoned);
  b.setUptime(v.uptime);
  b.setScore(v.score);
}
Reputation get(wire::Reputation::Reader r, const In&) {
  return {r.getCompletedSteps(), r.getLeasesClean(), r.getLeasesAbandoned(), r.getUptime(), r.getScore()};
}

void put(wire::Offer::Builder b, const Offer& v) {
  b.setId(v.id);
  b.setProvider(data_of(v.provider));
  put(b.initSpec(), v.spec);
  put(b.initReputation(), v.reputation);
  b.setActive(v.active);
  b.setCreatedMs(v.created_ms);
  b.setLastHeartbeatMs(v.last_heartbeat_ms);
}
Offer get(wire::Offer::Reader r, const In& in) {
  Offer v;
  v.id = r.getId();
  v.provider = key_of(r.getProvider(), "offer.provider", in.source);
  v.spec = get(r.getSpec(), in);
  v.reputation = get(r.getReputation(), in);
  v.active = r.getActive();
  v.created_ms = r.getCreatedMs();
  v.last_heartbeat_ms = r.getLastHeartbeatMs();
  return v;
}

void put(wire::OfferFilter::Builder b, const OfferFilter& v) {
  b.setGpuModel(v.gpu_model);
  b.setMinVramGib(v.min_vram_gib);
  b.setMinGpuCount(v.min_gpu_count);
  b.setMaxPricePerStep(v.max_price_per_step);
  b.setRegion(v.region);
  b.setMinReputation(v.min_reputation);
  b.setAliveOnly(v.alive_only);
  b.setSort(static_cast<uint8_t>(v.sort));
  b.setLimit(v.limit);
  b.setPageToken(v.page_token);
}
OfferFilter get(wire::OfferFilter::Reader r, const In& in) {
  OfferFilter v;
  v.gpu_model = in.text(r.getGpuModel(), "filter.gpuModel");
  v.min_vram_gib = r.getMinVramGib();
  v.min_gpu_count = r.getMinGpuCount();
  v.max_price_per_step = r.getMaxPricePerStep();
  v.region = in.text(r.getRegion(), "filter.region");
  v.min_reputation = r.getMinReputation();
  v.alive_only = r.getAliveOnly();
  v.sort = in.enumeration(r.getSort(), OfferSort::Latency, "filter.sort");
  v.limit = r.getLimit();
  v.page_token = r.getPageToken();
  return v;
}

void put(wire::OrderSpec::Builder b, const OrderSpec& v) {
  put(b.initFilter(), v.filter);
  b.setCount(v.count);
  b.setMaxPricePerStep(v.max_price_per_step);
  b.setEscrowPerLease(v.escrow_per_lease);
  b.setLeaseDurationS(v.lease_duration_s);
}
OrderSpec get(wire::OrderSpec::Reader r, const In& in) {
  return {get(r.getFilter(), in), r.getCount(), r.getMaxPricePerStep(), r.getEscrowPerLease(), r.getLeaseDurationS()};
}

void put(wire::Order::Builder b, const Order& v) {
  b.setId(v.id);
  b.setRenter(data_of(v.renter));
  put(b.initSpec(), v.spec);
  b.setState(static_cast<uint8_t>(v.state));
  b.setLeased(v.leased);
  b.setCreatedMs(v.created_ms);
}
Order get(wire::Order::Reader r, const In& in) {
  Order v;
  v.id = r.getId();
  v.renter = key_of(r.getRenter(), "order.renter", in.source);
  v.spec = get(r.getSpec(), in);
  v.state = in.enumeration(r.getState(), OrderState::Cancelled, "order.state");
  v.leased = r.getLeased();
  v.created_ms = r.getCreatedMs();
  return v;
}

void put(wire::Bid::Builder b, const Bid& v) {
  b.setId(v.id);
  b.setOrderId(v.order_id);
  b.setOfferId(v.offer_id);
  b.setProvider(data_of(v.provider));
  b.setPricePerStep(v.price_per_step);
  b.setState(static_cast<uint8_t>(v.state));
  b.setCreatedMs(v.created_ms);
}
Bid get(wire::Bid::Reader r, const In& in) {
  Bid v;
  v.id = r.getId();
  v.order_id = r.getOrderId();
  v.offer_id = r.getOfferId();
  v.provider = key_of(r.getProvider(), "bid.provider", in.source);
  v.price_per_step = r.getPricePerStep();
  v.state = in.enumeration(r.getState(), BidState::Withdrawn, "bid.state");
  v.created_ms = r.getCreatedMs();
  return v;
}

void put(wire::Lease::Builder b, const Lease& v) {
  b.setId(v.id);
  b.setOrderId(v.order_id);
  b.setOfferId(v.offer_id);
  b.setBidId(v.bid_id);
  b.setRenter(data_of(v.renter));
  b.setProvider(data_of(v.provider));
  b.setEndpoint(v.endpoint);
  b.setPricePerStep(v.price_per_step);
  b.setEscrow(v.escrow);
  b.setPaid(v.paid);
  b.setPaidStep(v.paid_step);
  b.setState(static_cast<uint8_t>(v.state));
  b.setCloseReason(static_cast<uint8_t>(v.close_reason));
  b.setStartedMs(v.started_ms);
  b.setExpiresMs(v.expires_ms);
  b.setClosedMs(v.closed_ms);
  b.setProviderLastHeartbeatMs(v.provider_last_heartbeat_ms);
}
Lease get(wire::Lease::Reader r, const In& in) {
  Lease v;
  v.id = r.getId();
  v.order_id = r.getOrderId();
  v.offer_id = r.getOfferId();
  v.bid_id = r.getBidId();
  v.renter = key_of(r.getRenter(), "lease.renter", in.source);
  v.provider = key_of(r.getProvider(), "lease.provider", in.source);
  v.endpoint = in.text(r.getEndpoint(), "lease.endpoint");
  v.price_per_step = r.getPricePerStep();
  v.escrow = r.getEscrow();
  v.paid = r.getPaid();
  v.paid_step = r.getPaidStep();
  v.state = in.enumeration(r.getState(), LeaseState::Closed, "lease.state");
  v.close_reason = in.enumeration(r.getCloseReason(), CloseReason::Expired, "lease.closeReason");
  v.started_ms = r.getStartedMs();
  v.expires_ms = r.getExpiresMs();
  v.closed_ms = r.getClosedMs();
  v.provider_last_heartbeat_ms = r.getProviderLastHeartbeatMs();
  return v;
}

void put(wire::Account::Builder b, const Account& v) {
  b.setId(data_of(v.id));
  b.setBalance(v.balance);
  b.setEscrowed(v.escrowed);
  b.setEarned(v.earned);
  b.setSpent(v.spent);
}
Account get(wire::Account::Reader r, const In& in) {
  return {key_of(r.getId(), "account.id", in.source), r.getBalance(), r.getEscrowed(), r.getEarned(), r.getSpent()};
}

void put(wire::Voucher::Builder b, const Voucher& v) {
  b.setLeaseId(v.lease_id);
  b.setStep(v.step);
  b.setCumulativeAmount(v.cumulative_amount);
  b.setNonce(v.nonce);
  b.setSignature(data_of(v.signature));
}
Voucher get(wire::Voucher::Reader r, const In& in) {
  Voucher v;
  v.lease_id = r.getLeaseId();
  v.step = r.getStep();
  v.cumulative_amount = r.getCumulativeAmount();
  v.nonce = r.getNonce();
  v.signature = signature_of(r.getSignature(), "voucher.signature", in.source);
  return v;
}

void put(wire::OptionalAccount::Builder b, const std::optional<AccountId>& v) {
  b.setPresent(v.has_value());
  if (v) b.setId(data_of(*v));
}
std::optional<AccountId> get(wire::OptionalAccount::Reader r, std::string_view field, const In& in) {
  if (!r.getPresent()) return std::nullopt;
  return key_of(r.getId(), field, in.source);
}

template <typename T, typename ListBuilder>
void put_list(ListBuilder list, const std::vector<T>& items) {
  for (size_t i = 0; i < items.size(); ++i) put(list[static_cast<unsigned>(i)], items[i]);
}

template <typename T, typename ListReader>
std::vector<T> get_list(ListReader list, std::string_view field, const In& in) {
  in.bounded(list, field);
  std::vector<T> out;
  out.reserve(list.size());
  for (auto item : list) out.push_back(get(item, in));
  return out;
}

// --- requests ----------------------------------------------------------------------------------

template <class... Ts>
struct Overloaded : Ts... {
  using Ts::operator()...;
};

void put_body(wire::MarketRequest::Body::Builder b, const Body& body) {
  std::visit(Overloaded{
                 [&](const Mint& m) {
                   auto g = b.initMint();
                   g.setTo(data_of(m.to));
                   g.setAmount(m.amount);
                 },
                 [&](const AccountQuery& q) { b.setAccount(data_of(q.who)); },
                 [&](const OfferSpec& s) { put(b.initOffer(), s); },
                 [&](const WithdrawOffer& w) { b.setWithdrawOffer(w.offer_id); },
                 [&](const PlaceBid& p) {
                   auto g = b.initBid();
                   g.setOrderId(p.order_id);
                   g.setOfferId(p.offer_id);
                   g.setPricePerStep(p.price_per_step);
                 },
                 [&](const Heartbeat&) { b.setHeartbeat(); },
                 [&](const Redeem& r) { put(b.initRedeem(), r.voucher); },
                 [&](const Discover& d) { put(b.initDiscover(), d.filter); },
                 [&](const PlaceOrder& o) { put(b.initOrder(), o.spec); },
                 [&](const CancelOrder& c) { b.setCancelOrder(c.order_id); },
                 [&](const BidsQuery& q) { b.setBids(q.order_id); },
                 [&](const Accept& a) { b.setAccept(a.bid_id); },
                 [&](const Close& c) {
                   auto g = b.initClose();
                   g.setLeaseId(c.lease_id);
                   g.setReason(static_cast<uint8_t>(c.reason));
                   g.setHasVoucher(c.voucher.has_value());
                   if (c.voucher) put(g.initVoucher(), *c.voucher);
                 },
                 [&](const OrderQuery& q) {
                   auto g = b.initOrders();
                   put(g.initRenter(), q.renter);
                   g.setOpenOnly(q.open_only);
                   g.setMatchingOffer(q.matching_offer.value_or(0));
                   g.setLimit(q.limit);
                 },
                 [&](const LeaseQuery& q) {
                   auto g = b.initLeases();
                   put(g.initRenter(), q.renter);
                   put(g.initProvider(), q.provider);
                   g.setOpenOnly(q.open_only);
                   g.setLimit(q.limit);
                 },
                 [&](const LeaseLookup& l) { b.setLease(l.lease_id); },
                 [&](const ReputationQuery& q) { b.setReputation(data_of(q.provider)); },
             },
             body);
}

Body get_body(wire::MarketRequest::Body::Reader b, const In& in) {
  using W = wire::MarketRequest::Body;
  switch (b.which()) {
    case W::MINT: return Mint{key_of(b.getMint().getTo(), "mint.to", in.source), b.getMint().getAmount()};
    case W::ACCOUNT: return AccountQuery{key_of(b.getAccount(), "account", in.source)};
    case W::OFFER: return get(b.getOffer(), in);
    case W::WITHDRAW_OFFER: return WithdrawOffer{b.getWithdrawOffer()};
    case W::BID: return PlaceBid{b.getBid().getOrderId(), b.getBid().getOfferId(), b.getBid().getPricePerStep()};
    case W::HEARTBEAT: return Heartbeat{};
    case W::REDEEM: return Redeem{get(b.getRedeem(), in)};
    case W::DISCOVER: return Discover{get(b.getDiscover(), in)};
    case W::ORDER: return PlaceOrder{get(b.getOrder(), in)};
    case W::CANCEL_ORDER: return CancelOrder{b.getCancelOrder()};
    case W::BIDS: return BidsQuery{b.getBids()};
    case W::ACCEPT: return Accept{b.getAccept()};
    case W::CLOSE: {
      auto g = b.getClose();
      Close c{g.getLeaseId(), in.enumeration(g.getReason(), CloseReason::Expired, "close.reason"), std::nullopt};
      if (g.getHasVoucher()) c.voucher = get(g.getVoucher(), in);
      return c;
    }
    case W::ORDERS: {
      auto g = b.getOrders();
      OrderQuery q;
      q.renter = get(g.getRenter(), "orders.renter", in);
      q.open_only = g.getOpenOnly();
      if (g.getMatchingOffer() != 0) q.matching_offer = g.getMatchingOffer();
      q.limit = g.getLimit();
      return q;
    }
    case W::LEASES: {
      auto g = b.getLeases();
      LeaseQuery q;
      q.renter = get(g.getRenter(), "leases.renter", in);
      q.provider = get(g.getProvider(), "leases.provider", in);
      q.open_only = g.getOpenOnly();
      q.limit = g.getLimit();
      return q;
    }
    case W::LEASE: return LeaseLookup{b.getLease()};
    case W::REPUTATION: return ReputationQuery{key_of(b.getReputation(), "reputation", in.source)};
  }
  throw ProtocolError(fmt::format("{}: market request of unknown kind {}", in.source, static_cast<int>(b.which())));
}

std::vector<uint8_t> signed_bytes(crypto::ByteSpan request) { return with_domain(kRequestDomain, request); }

}  // namespace

std::vector<uint8_t> with_domain(std::string_view domain, crypto::ByteSpan body) {
  std::vector<uint8_t> out(domain.size() + body.size());
  std::memcpy(out.data(), domain.data(), domain.size());
  if (!body.empty()) std::memcpy(out.data() + domain.size(), body.data(), body.size());
  return out;
}

bool changes_state(const Body& body) noexcept {
  return !(std::holds_alternative<AccountQuery>(body) || std::holds_alternative<Discover>(body) ||
           std::holds_alternative<BidsQuery>(body) || std::holds_alternative<OrderQuery>(body) ||
           std::holds_alternative<LeaseQuery>(body) || std::holds_alternative<LeaseLookup>(body) ||
           std::holds_alternative<ReputationQuery>(body));
}

std::string_view request_name(const Body& body) noexcept {
  static constexpr std::string_view kNames[] = {"mint",   "account",      "offer", "withdraw_offer", "bid",
                                                "heartbeat", "redeem",     "discover", "order",      "cancel_order",
                                                "bids",   "accept",       "close", "orders",         "leases",
                                                "lease",  "reputation"};
  static_assert(std::size(kNames) == std::variant_size_v<Body>);
  return kNames[body.index()];
}

std::vector<uint8_t> encode_signed(const Request& request, const crypto::Identity& signer) {
  if (signer.public_key() != request.account)
    throw InvalidArgumentError(fmt::format("market request '{}': signer {} is not the request's account {}",
                                           request_name(request.body), signer.public_key().fingerprint(),
                                           request.account.fingerprint()));
  capnp::MallocMessageBuilder inner;
  auto r = inner.initRoot<wire::MarketRequest>();
  r.setAccount(data_of(request.account));
  r.setNonce(request.nonce);
  put_body(r.initBody(), request.body);
  std::vector<uint8_t> bytes = wire::to_bytes(inner);
  if (bytes.size() > kMaxRequestBytes)
    throw InvalidArgumentError(fmt::format("market request '{}' is {} bytes (limit {})", request_name(request.body),
                                           bytes.size(), kMaxRequestBytes));
  crypto::Signature signature = signer.sign(signed_bytes(bytes));
  capnp::MallocMessageBuilder outer;
  auto e = outer.initRoot<wire::MarketRequestEnvelope>();
  e.setRequest(capnp::Data::Reader(bytes.data(), bytes.size()));
  e.setSignature(data_of(signature));
  return wire::to_bytes(outer);
}

Request decode_signed(crypto::ByteSpan bytes, std::string_view source) {
  if (bytes.size() > kMaxRequestBytes + 256)
    throw ProtocolError(fmt::format("{}: market request of {} bytes (limit {})", source, bytes.size(), kMaxRequestBytes));
  In in{source};
  auto [inner, signature] = wire::read_message<wire::MarketRequestEnvelope>(
      bytes, "market request envelope", source,
      [&](wire::MarketRequestEnvelope::Reader e) {
        auto d = e.getRequest();
        return std::make_pair(std::vector<uint8_t>(d.begin(), d.end()),
                              signature_of(e.getSignature(), "signature", source));
      },
      kRequestLimits);
  Request request = wire::read_message<wire::MarketRequest>(
      inner, "market request", source,
      [&](wire::MarketRequest::Reader r) {
        Request out;
        out.account = key_of(r.getAccount(), "account", source);
        out.nonce = r.getNonce();
        out.body = get_body(r.getBody(), in);
        return out;
      },
      kRequestLimits);
  if (!crypto::is_valid_signature(request.account, signed_bytes(inner), signature))
    throw AuthError(fmt::format("{}: market request '{}' is not signed by its account {}", source,
                                request_name(request.body), request.account.fingerprint()));
  return request;
}

// --- replies -----------------------------------------------------------------------------------

std::vector<uint8_t> encode(const Reply& reply) {
  capnp::MallocMessageBuilder builder;
  auto r = builder.initRoot<wire::MarketReply>();
  r.setOk(reply.ok);
  r.setErrorCode(static_cast<int32_t>(reply.code));
  r.setErrorReason(reply.reason);
  r.setErrorMessage(reply.message);
  auto b = r.initBody();
  std::visit(Overloaded{
                 [&](std::monostate) { b.setNone(); },
                 [&](Id id) { b.setId(id); },
                 [&](const Account& a) { put(b.initAccount(), a); },
                 [&](const OfferPage& p) {
                   auto g = b.initOffers();
                   put_list(g.initItems(static_cast<unsigned>(p.offers.size())), p.offers);
                   g.setNextPageToken(p.next_page_token);
                   g.setTotal(p.total);
                 },
                 [&](const std::vector<Order>& v) { put_list(b.initOrders(static_cast<unsigned>(v.size())), v); },
                 [&](const std::vector<Bid>& v) { put_list(b.initBids(static_cast<unsigned>(v.size())), v); },
                 [&](const Lease& l) { put(b.initLease(), l); },
                 [&](const std::vector<Lease>& v) { put_list(b.initLeases(static_cast<unsigned>(v.size())), v); },
                 [&](const RedeemResult& x) {
                   auto g = b.initRedeem();
                   g.setPaidNow(x.paid_now);
                   put(g.initLease(), x.lease);
                 },
                 [&](const Reputation& x) { put(b.initReputation(), x); },
             },
             reply.body);
  return wire::to_bytes(builder);
}

Reply decode_reply(crypto::ByteSpan bytes, std::string_view source) {
  if (bytes.size() > kMaxReplyBytes)
    throw ProtocolError(fmt::format("{}: market reply of {} bytes (limit {})", source, bytes.size(), kMaxReplyBytes));
  In in{source};
  return wire::read_message<wire::MarketReply>(
      bytes, "market reply", source,
      [&](wire::MarketReply::Reader r) {
        Reply out;
        out.ok = r.getOk();
        int32_t code = r.getErrorCode();
        if (code < static_cast<int32_t>(ErrorCode::Timeout) || code > static_cast<int32_t>(ErrorCode::Internal))
          code = static_cast<int32_t>(ErrorCode::Internal);
        out.code = static_cast<ErrorCode>(code);
        out.reason = in.text(r.getErrorReason(), "errorReason");
        out.message = in.text(r.getErrorMessage(), "errorMessage");
        auto b = r.getBody();
        using W = wire::MarketReply::Body;
        switch (b.which()) {
          case W::NONE: break;
          case W::ID: out.body = Id{b.getId()}; break;
          case W::ACCOUNT: out.body = get(b.getAccount(), in); break;
          case W::OFFERS: {
            OfferPage page;
            page.offers = get_list<Offer>(b.getOffers().getItems(), "offers", in);
            page.next_page_token = b.getOffers().getNextPageToken();
            page.total = b.getOffers().getTotal();
            out.body = std::move(page);
            break;
          }
          case W::ORDERS: out.body = get_list<Order>(b.getOrders(), "orders", in); break;
          case W::BIDS: out.body = get_list<Bid>(b.getBids(), "bids", in); break;
          case W::LEASE: out.body = get(b.getLease(), in); break;
          case W::LEASES: out.body = get_list<Lease>(b.getLeases(), "leases", in); break;
          case W::REDEEM: out.body = RedeemResult{b.getRedeem().getPaidNow(), get(b.getRedeem().getLease(), in)}; break;
          case W::REPUTATION: out.body = get(b.getReputation(), in); break;
          default:
            throw ProtocolError(fmt::format("{}: market reply of unknown kind {}", source, static_cast<int>(b.which())));
        }
        return out;
      },
      kReplyLimits);
}

Reply error_reply(const std::exception& error) {
  Reply reply;
  reply.ok = false;
  reply.message = error.what();
  if (const auto* market = dynamic_cast<const MarketError*>(&error)) {
    reply.code = market->code();
    reply.reason = market->reason();
  } else if (const auto* ours = dynamic_cast<const Error*>(&error)) {
    reply.code = ours->code();
  } else {
    reply.code = ErrorCode::Internal;
  }
  if (reply.message.size() > kMaxTextBytes) reply.message.resize(kMaxTextBytes);
  return reply;
}

void throw_reply_error(const Reply& reply, std::string_view what) {
  std::string message = fmt::format("{}: {}", what, reply.message);
  if (!reply.reason.empty()) throw MarketError(reply.reason, message);
  switch (reply.code) {
    case ErrorCode::Timeout: throw TimeoutError(message);
    case ErrorCode::Protocol: throw ProtocolError(message);
    case ErrorCode::Auth: throw AuthError(message);
    case ErrorCode::Corrupt: throw CorruptError(message);
    case ErrorCode::InvalidArgument: throw InvalidArgumentError(message);
    case ErrorCode::Cancelled: throw CancelledError(message);
    default: throw InternalError(message);
  }
}

// --- provider daemon messages -------------------------------------------------------------------

std::vector<uint8_t> encode(const Voucher& voucher) {
  return wire::build_message<wire::VoucherDelivery>([&](auto r) { put(r.initVoucher(), voucher); });
}

Voucher decode_voucher(crypto::ByteSpan bytes, std::string_view source) {
  In in{source};
  return wire::read_message<wire::VoucherDelivery>(
      bytes, "voucher", source, [&](wire::VoucherDelivery::Reader r) { return get(r.getVoucher(), in); },
      kRequestLimits);
}

std::vector<uint8_t> encode(const VoucherAck& ack) {
  return wire::build_message<wire::VoucherAck>([&](auto r) {
    r.setAccepted(ack.accepted);
    r.setReason(ack.reason);
    r.setLatestStep(ack.latest_step);
    r.setLatestAmount(ack.latest_amount);
  });
}

VoucherAck decode_voucher_ack(crypto::ByteSpan bytes, std::string_view source) {
  In in{source};
  return wire::read_message<wire::VoucherAck>(
      bytes, "voucher ack", source,
      [&](wire::VoucherAck::Reader r) {
        return VoucherAck{r.getAccepted(), in.text(r.getReason(), "reason"), r.getLatestStep(), r.getLatestAmount()};
      },
      kRequestLimits);
}

std::vector<uint8_t> encode(const JobAttach& attach) {
  return wire::build_message<wire::JobAttach>([&](auto r) {
    r.setLeaseId(attach.lease_id);
    r.setCoordinatorEndpoint(attach.coordinator_endpoint);
    r.setCoordinatorKey(data_of(attach.coordinator_key));
    r.setJoinToken(attach.join_token);
  });
}

JobAttach decode_job_attach(crypto::ByteSpan bytes, std::string_view source) {
  In in{source};
  return wire::read_message<wire::JobAttach>(
      bytes, "job attach", source,
      [&](wire::JobAttach::Reader r) {
        return JobAttach{r.getLeaseId(), in.text(r.getCoordinatorEndpoint(), "coordinatorEndpoint"),
                         key_of(r.getCoordinatorKey(), "coordinatorKey", source),
                         in.text(r.getJoinToken(), "joinToken")};
      },
      kRequestLimits);
}

std::vector<uint8_t> encode(const JobAttachAck& ack) {
  return wire::build_message<wire::JobAttachAck>([&](auto r) {
    r.setAccepted(ack.accepted);
    r.setReason(ack.reason);
  });
}

JobAttachAck decode_job_attach_ack(crypto::ByteSpan bytes, std::string_view source) {
  In in{source};
  return wire::read_message<wire::JobAttachAck>(
      bytes, "job attach ack", source,
      [&](wire::JobAttachAck::Reader r) { return JobAttachAck{r.getAccepted(), in.text(r.getReason(), "reason")}; },
      kRequestLimits);
}

}  // namespace meshtrain::market::protocol
