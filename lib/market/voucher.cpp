// Vouchers and hardware reports: what a renter and a provider sign outside of any request, so
// that a third party (the ledger, the provider daemon, a renter) can check them on its own.
#include <cstring>

#include "market/protocol.h"
#include "meshtrain/market.h"

namespace meshtrain::market {
namespace {

void append_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

std::vector<uint8_t> report_bytes(std::string_view text) {
  return protocol::with_domain(kHardwareReportDomain,
                               crypto::ByteSpan(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

}  // namespace

HardwareReport HardwareReport::sign(const crypto::Identity& provider, std::string text) {
  HardwareReport report;
  report.signature = provider.sign(report_bytes(text));
  report.text = std::move(text);
  return report;
}

void HardwareReport::verify(const AccountId& provider) const {
  if (!crypto::is_valid_signature(provider, report_bytes(text), signature))
    throw AuthError(fmt::format("hardware report of provider {}: signature does not verify", provider.fingerprint()));
}

Voucher Voucher::sign(const crypto::Identity& renter, Id lease_id, uint64_t step, Amount cumulative_amount,
                      uint64_t nonce) {
  Voucher v;
  v.lease_id = lease_id;
  v.step = step;
  v.cumulative_amount = cumulative_amount;
  v.nonce = nonce;
  v.signature = renter.sign(v.signed_bytes());
  return v;
}

std::vector<uint8_t> Voucher::signed_bytes() const {
  std::vector<uint8_t> out = protocol::with_domain(kVoucherDomain, {});
  append_u64(out, lease_id);
  append_u64(out, step);
  append_u64(out, cumulative_amount);
  append_u64(out, nonce);
  return out;
}

void Voucher::verify(const AccountId& renter) const {
  if (!crypto::is_valid_signature(renter, signed_bytes(), signature))
    throw AuthError(fmt::format("voucher for lease {} step {}: not signed by the lease's renter {}", lease_id, step,
                                renter.fingerprint()));
}

std::string_view close_reason_name(CloseReason reason) noexcept {
  switch (reason) {
    case CloseReason::None: return "none";
    case CloseReason::RenterDone: return "renter_done";
    case CloseReason::ProviderDone: return "provider_done";
    case CloseReason::ProviderFailed: return "provider_failed";
    case CloseReason::Expired: return "expired";
  }
  return "unknown";
}

std::string_view lease_state_name(LeaseState state) noexcept {
  return state == LeaseState::Open ? "open" : state == LeaseState::Closed ? "closed" : "unknown";
}

std::string_view order_state_name(OrderState state) noexcept {
  switch (state) {
    case OrderState::Open: return "open";
    case OrderState::Filled: return "filled";
    case OrderState::Cancelled: return "cancelled";
  }
  return "unknown";
}

std::string_view bid_state_name(BidState state) noexcept {
  switch (state) {
    case BidState::Open: return "open";
    case BidState::Accepted: return "accepted";
    case BidState::Withdrawn: return "withdrawn";
  }
  return "unknown";
}

}  // namespace meshtrain::market
