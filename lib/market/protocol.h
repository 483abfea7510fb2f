// The market's wire protocol (lib/wire/market.capnp) as C++ values: signed requests to
// meshtrain-market and their replies, and voucher delivery to a provider daemon. Shared by the
// market server, DevnetBackend, MarketClient and the provider daemon.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "meshtrain/market.h"
#include "meshtrain/net.h"

namespace meshtrain::market::protocol {

// Control-path message types (net::MessageHeader::type). The request id travels in op_seq and
// is echoed in the reply.
enum class MessageType : uint16_t {
  Request = 1024,          // payload: encode_signed(Request)
  Reply = 1025,            // payload: encode(Reply)
  VoucherDelivery = 1026,  // renter -> provider daemon; payload: encode(Voucher)
  VoucherAck = 1027,       // provider daemon -> renter; payload: encode(VoucherAck)
  JobAttach = 1028,        // renter -> provider daemon; payload: encode(JobAttach)
  JobAttachAck = 1029,     // provider daemon -> renter; payload: encode(JobAttachAck)
};

// `domain` || `body`: what every market signature covers, so a signature made for one purpose
// (request, voucher, hardware report) never verifies for another.
std::vector<uint8_t> with_domain(std::string_view domain, crypto::ByteSpan body);

inline constexpr std::string_view kRequestDomain = "meshtrain-market-request-v1";
inline constexpr size_t kMaxRequestBytes = 64 << 10;
inline constexpr size_t kMaxReplyBytes = 8 << 20;
inline constexpr size_t kMaxTextBytes = 4096;        // any Text field (hardware report included)
inline constexpr uint32_t kMaxPageSize = 1000;       // offers, orders, bids, leases per reply

struct Mint { AccountId to; Amount amount = 0; };
struct AccountQuery { AccountId who; };
struct WithdrawOffer { Id offer_id = 0; };
struct PlaceBid { Id order_id = 0; Id offer_id = 0; Amount price_per_step = 0; };
struct Heartbeat {};
struct Redeem { Voucher voucher; };
struct Discover { OfferFilter filter; };
struct PlaceOrder { OrderSpec spec; };
struct CancelOrder { Id order_id = 0; };
struct BidsQuery { Id order_id = 0; };
struct Accept { Id bid_id = 0; };
struct Close { Id lease_id = 0; CloseReason reason = CloseReason::RenterDone; std::optional<Voucher> voucher; };
struct LeaseLookup { Id lease_id = 0; };
struct ReputationQuery { AccountId provider; };

using Body = std::variant<Mint, AccountQuery, OfferSpec, WithdrawOffer, PlaceBid, Heartbeat, Redeem, Discover,
                          PlaceOrder, CancelOrder, BidsQuery, Accept, Close, OrderQuery, LeaseQuery, LeaseLookup,
                          ReputationQuery>;

struct Request {
  AccountId account;   // the acting (and signing) account
  uint64_t nonce = 0;  // state-changing requests: above the account's last accepted nonce
  Body body;
};

// Queries are answered whatever their nonce; everything else must carry a fresh one.
bool changes_state(const Body& body) noexcept;
// "mint", "offer", "redeem", ... for logs, errors and the event log.
std::string_view request_name(const Body& body) noexcept;

// Encodes and signs (kRequestDomain || request bytes) with `signer`, whose key must be
// request.account (InvalidArgumentError otherwise).
std::vector<uint8_t> encode_signed(const Request& request, const crypto::Identity& signer);
// Decodes and checks the signature against the request's own account. Throws ProtocolError
// (malformed, oversized, a field out of range) or AuthError (bad signature), naming `source`.
Request decode_signed(crypto::ByteSpan bytes, std::string_view source);

using ReplyBody = std::variant<std::monostate, Id, Account, OfferPage, std::vector<Order>, std::vector<Bid>, Lease,
                               std::vector<Lease>, RedeemResult, Reputation>;

struct Reply {
  bool ok = true;
  ErrorCode code = ErrorCode::Internal;  // when !ok
  std::string reason;                    // MarketError::reason() when !ok
  std::string message;
  ReplyBody body;
};

std::vector<uint8_t> encode(const Reply& reply);
Reply decode_reply(crypto::ByteSpan bytes, std::string_view source);
// The reply that reports `error` (MarketError keeps its reason; other meshtrain::Error keep their
// code; anything else is Internal).
Reply error_reply(const std::exception& error);
// Throws the error a failed reply carries (MarketError, AuthError, ...), prefixed with `what`.
[[noreturn]] void throw_reply_error(const Reply& reply, std::string_view what);

std::vector<uint8_t> encode(const Voucher& voucher);
Voucher decode_voucher(crypto::ByteSpan bytes, std::string_view source);

struct VoucherAck {
  bool accepted = false;
  std::string reason;       // why not: "stale_voucher", "wrong_increment", "lease_closed", ...
  uint64_t latest_step = 0; // the provider's latest accepted voucher for the lease
  Amount latest_amount = 0;
};
std::vector<uint8_t> encode(const VoucherAck& ack);
VoucherAck decode_voucher_ack(crypto::ByteSpan bytes, std::string_view source);

// Where the provider's worker joins the renter's job (sent by the renter after accept).
struct JobAttach {
  Id lease_id = 0;
  std::string coordinator_endpoint;
  AccountId coordinator_key;
  std::string join_token;   // empty: the provider's key is on the job's allow-list
};
std::vector<uint8_t> encode(const JobAttach& attach);
JobAttach decode_job_attach(crypto::ByteSpan bytes, std::string_view source);

struct JobAttachAck {
  bool accepted = false;
  std::string reason;
};
std::vector<uint8_t> encode(const JobAttachAck& ack);
JobAttachAck decode_job_attach_ack(crypto::ByteSpan bytes, std::string_view source);

}  // namespace meshtrain::market::protocol
