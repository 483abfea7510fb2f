// The market's wire protocol: every request and reply survives a round trip, signatures bind
// the request to its account, and damaged or out-of-range input is refused, never misread.
#include <gtest/gtest.h>

#include <random>

#include "market/protocol.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace meshtrain::market::protocol;

namespace {

OfferSpec sample_offer(const crypto::Identity& provider) {
  OfferSpec s;
  s.gpu = {"H100-80GB", 8, 80, "9.0"};
  s.price_per_step = 120;
  s.price_per_hour_idle = 5000;
  s.region = "eu-west";
  s.endpoint = "tcp://10.0.0.5:7600";
  s.latency_hint_ms = 18;
  s.hardware = HardwareReport::sign(provider, R"({"driver":"560.35","gpus":8})");
  return s;
}

Request roundtrip(const Request& r, const crypto::Identity& signer) {
  return decode_signed(encode_signed(r, signer), "test");
}

}  // namespace

TEST(MarketProtocol, EveryRequestKindRoundTrips) {
  auto renter = crypto::Identity::generate();
  auto provider = crypto::Identity::generate();
  OfferFilter filter;
  filter.gpu_model = "A100";
  filter.min_vram_gib = 40;
  filter.max_price_per_step = 99;
  filter.sort = OfferSort::Latency;
  filter.limit = 7;
  filter.page_token = 14;
  Voucher v = Voucher::sign(renter, 3, 10, 1200, 77);
  std::vector<Body> bodies = {
      Mint{provider.public_key(), 1000},
      AccountQuery{provider.public_key()},
      sample_offer(provider),
      WithdrawOffer{4},
      PlaceBid{5, 6, 7},
      Heartbeat{},
      Redeem{v},
      Discover{filter},
      PlaceOrder{OrderSpec{filter, 3, 100, 50000, 600}},
      CancelOrder{8},
      BidsQuery{9},
      Accept{10},
      Close{11, CloseReason::ProviderFailed, v},
      Close{12, CloseReason::RenterDone, std::nullopt},
      OrderQuery{renter.public_key(), false, Id{13}, 20},
      LeaseQuery{std::nullopt, provider.public_key(), true, 30},
      LeaseLookup{14},
      ReputationQuery{provider.public_key()},
  };
  for (const Body& body : bodies) {
    Request in{renter.public_key(), 42, body};
    Request out = roundtrip(in, renter);
    EXPECT_EQ(out.account, in.account);
    EXPECT_EQ(out.nonce, 42u);
    ASSERT_EQ(out.body.index(), in.body.index()) << request_name(body);
    // Re-encoding what was decoded gives the same request bytes: nothing was lost.
    auto again = encode_signed(out, renter);
    EXPECT_EQ(decode_signed(again, "test").body.index(), in.body.index());
  }
  auto offer = std::get<OfferSpec>(roundtrip({renter.public_key(), 1, sample_offer(provider)}, renter).body);
  EXPECT_EQ(offer.gpu.model, "H100-80GB");
  EXPECT_EQ(offer.gpu.count, 8u);
  EXPECT_EQ(offer.latency_hint_ms, 18u);
  EXPECT_NO_THROW(offer.hardware.verify(provider.public_key()));
  auto close = std::get<Close>(roundtrip({renter.public_key(), 1, Close{11, CloseReason::ProviderFailed, v}}, renter).body);
  ASSERT_TRUE(close.voucher);
  EXPECT_EQ(*close.voucher, v);
  EXPECT_EQ(close.reason, CloseReason::ProviderFailed);
  auto q = std::get<OrderQuery>(roundtrip({renter.public_key(), 0, OrderQuery{std::nullopt, true, std::nullopt, 5}}, renter).body);
  EXPECT_FALSE(q.renter);
  EXPECT_FALSE(q.matching_offer);
  EXPECT_FALSE(changes_state(Discover{}));
  EXPECT_TRUE(changes_state(Redeem{v}));
}

TEST(MarketProtocol, SignatureBindsRequestToItsAccount) {
  auto renter = crypto::Identity::generate();
  auto other = crypto::Identity::generate();
  Request r{renter.public_key(), 5, Accept{1}};
  EXPECT_THROW(encode_signed(r, other), InvalidArgumentError);
  auto bytes = encode_signed(r, renter);
  // Flipping any single bit anywhere is refused (AuthError or ProtocolError), never accepted.
  for (size_t i = 0; i < bytes.size(); ++i) {
    auto damaged = bytes;
    damaged[i] ^= 0x10;
    try {
      Request got = decode_signed(damaged, "test");
      // Only bits the decoder never reads (padding) may flip without effect.
      EXPECT_EQ(got.nonce, 5u);
      EXPECT_EQ(std::get<Accept>(got.body).bid_id, 1u);
      EXPECT_EQ(got.account, renter.public_key());
    } catch (const AuthError&) {
    } catch (const ProtocolError&) {
    }
  }
  for (size_t n = 0; n < bytes.size(); n += 3)
    EXPECT_THROW(decode_signed(std::span(bytes.data(), n), "test"), ProtocolError) << n;
}

TEST(MarketProtocol, OversizedAndOutOfRangeFieldsAreRefused) {
  auto renter = crypto::Identity::generate();
  OfferSpec big = sample_offer(renter);
  big.region = std::string(kMaxTextBytes + 1, 'x');
  auto bytes = encode_signed({renter.public_key(), 1, big}, renter);
  EXPECT_THROW(decode_signed(bytes, "test"), ProtocolError);
  OfferFilter f;
  f.sort = static_cast<OfferSort>(9);
  EXPECT_THROW(decode_signed(encode_signed({renter.public_key(), 0, Discover{f}}, renter), "test"), ProtocolError);
  std::vector<uint8_t> huge(kMaxRequestBytes + 1024, 0);
  EXPECT_THROW(decode_signed(huge, "test"), ProtocolError);
}

TEST(MarketProtocol, RepliesRoundTripAndCarryErrors) {
  auto a = crypto::Identity::generate();
  Lease lease;
  lease.id = 9;
  lease.renter = a.public_key();
  lease.provider = a.public_key();
  lease.escrow = 500;
  lease.paid = 120;
  lease.state = LeaseState::Closed;
  lease.close_reason = CloseReason::Expired;
  Reply r;
  r.body = RedeemResult{20, lease};
  Reply got = decode_reply(encode(r), "test");
  ASSERT_TRUE(got.ok);
  auto& redeemed = std::get<RedeemResult>(got.body);
  EXPECT_EQ(redeemed.paid_now, 20u);
  EXPECT_EQ(redeemed.lease.close_reason, CloseReason::Expired);
  OfferPage page;
  page.offers.resize(3);
  for (auto& o : page.offers) o.provider = a.public_key();
  page.total = 3;
  r.body = page;
  EXPECT_EQ(std::get<OfferPage>(decode_reply(encode(r), "test").body).offers.size(), 3u);

  Reply failed = decode_reply(encode(error_reply(MarketError("insufficient_funds", "balance 3 < 5"))), "test");
  EXPECT_FALSE(failed.ok);
  EXPECT_EQ(failed.reason, "insufficient_funds");
  try {
    throw_reply_error(failed, "order");
    FAIL();
  } catch (const MarketError& e) {
    EXPECT_EQ(e.reason(), "insufficient_funds");
    EXPECT_NE(std::string(e.what()).find("balance 3 < 5"), std::string::npos);
  }
  Reply auth = decode_reply(encode(error_reply(AuthError("replayed nonce"))), "test");
  EXPECT_THROW(throw_reply_error(auth, "redeem"), AuthError);
}

TEST(MarketProtocol, VoucherSignatureCoversEveryField) {
  auto renter = crypto::Identity::generate();
  auto other = crypto::Identity::generate();
  Voucher v = Voucher::sign(renter, 1, 2, 3, 4);
  EXPECT_NO_THROW(v.verify(renter.public_key()));
  EXPECT_THROW(v.verify(other.public_key()), AuthError);
  for (int field = 0; field < 4; ++field) {
    Voucher w = v;
    (field == 0 ? w.lease_id : field == 1 ? w.step : field == 2 ? w.cumulative_amount : w.nonce) += 1;
    EXPECT_THROW(w.verify(renter.public_key()), AuthError) << field;
  }
  Voucher decoded = decode_voucher(encode(v), "test");
  EXPECT_EQ(decoded, v);
  VoucherAck ack{false, "stale_voucher", 9, 90};
  auto back = decode_voucher_ack(encode(ack), "test");
  EXPECT_EQ(back.reason, "stale_voucher");
  EXPECT_EQ(back.latest_amount, 90u);
  JobAttach attach{5, "tcp://127.0.0.1:7400", renter.public_key(), "token"};
  auto attach_back = decode_job_attach(encode(attach), "test");
  EXPECT_EQ(attach_back.coordinator_key, renter.public_key());
  EXPECT_EQ(attach_back.join_token, "token");
  HardwareReport report = HardwareReport::sign(renter, "gpus: 1");
  EXPECT_NO_THROW(report.verify(renter.public_key()));
  report.text += " ";
  EXPECT_THROW(report.verify(renter.public_key()), AuthError);
}
