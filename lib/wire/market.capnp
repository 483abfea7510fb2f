@0xb7e61b3a2f0c9d41;
# meshtrain market protocol (docs/market.md). Carried as the payload of control-path messages:
# renter/provider -> meshtrain-market (MarketRequestEnvelope / MarketReply), renter -> provider
# daemon (VoucherDelivery / VoucherAck). All amounts are integers of the smallest unit.

$import "/capnp/c++.capnp".namespace("meshtrain::wire");

struct GpuSpec {
  model @0 :Text;
  count @1 :UInt32;
  vramGib @2 :UInt32;
  cudaCapability @3 :Text;
}

struct HardwareReport {
  text @0 :Text;
  signature @1 :Data;       # 64 bytes
}

struct OfferSpec {
  gpu @0 :GpuSpec;
  pricePerStep @1 :UInt64;
  pricePerHourIdle @2 :UInt64;
  region @3 :Text;
  endpoint @4 :Text;
  latencyHintMs @5 :UInt32;
  hardware @6 :HardwareReport;
}

struct Reputation {
  completedSteps @0 :UInt64;
  leasesClean @1 :UInt32;
  leasesAbandoned @2 :UInt32;
  uptime @3 :Float64;
  score @4 :Float64;
}

struct Offer {
  id @0 :UInt64;
  provider @1 :Data;
  spec @2 :OfferSpec;
  reputation @3 :Reputation;
  active @4 :Bool;
  createdMs @5 :Int64;
  lastHeartbeatMs @6 :Int64;
}

struct OfferFilter {
  gpuModel @0 :Text;
  minVramGib @1 :UInt32;
  minGpuCount @2 :UInt32;
  maxPricePerStep @3 :UInt64;
  region @4 :Text;
  minReputation @5 :Float64;
  aliveOnly @6 :Bool;
  sort @7 :UInt8;           # OfferSort
  limit @8 :UInt32;
  pageToken @9 :UInt64;
}

struct OrderSpec {
  filter @0 :OfferFilter;
  count @1 :UInt32;
  maxPricePerStep @2 :UInt64;
  escrowPerLease @3 :UInt64;
  leaseDurationS @4 :UInt64;
}

struct Order {
  id @0 :UInt64;
  renter @1 :Data;
  spec @2 :OrderSpec;
  state @3 :UInt8;          # OrderState
  leased @4 :UInt32;
  createdMs @5 :Int64;
}

struct Bid {
  id @0 :UInt64;
  orderId @1 :UInt64;
  offerId @2 :UInt64;
  provider @3 :Data;
  pricePerStep @4 :UInt64;
  state @5 :UInt8;          # BidState
  createdMs @6 :Int64;
}

struct Lease {
  id @0 :UInt64;
  orderId @1 :UInt64;
  offerId @2 :UInt64;
  bidId @3 :UInt64;
  renter @4 :Data;
  provider @5 :Data;
  endpoint @6 :Text;
  pricePerStep @7 :UInt64;
  escrow @8 :UInt64;
  paid @9 :UInt64;
  paidStep @10 :UInt64;
  state @11 :UInt8;         # LeaseState
  closeReason @12 :UInt8;   # CloseReason
  startedMs @13 :Int64;
  expiresMs @14 :Int64;
  closedMs @15 :Int64;
  providerLastHeartbeatMs @16 :Int64;
}

struct Account {
  id @0 :Data;
  balance @1 :UInt64;
  escrowed @2 :UInt64;
  earned @3 :UInt64;
  spent @4 :UInt64;
}

struct Voucher {
  leaseId @0 :UInt64;
  step @1 :UInt64;
  cumulativeAmount @2 :UInt64;
  nonce @3 :UInt64;
  signature @4 :Data;       # renter's Ed25519, 64 bytes
}

struct OptionalAccount {
  present @0 :Bool;
  id @1 :Data;
}

# The signed part of a market request. `account` is the acting key; it must equal the
# transport-authenticated sender. State-changing requests need nonce > the account's last.
struct MarketRequest {
  account @0 :Data;
  nonce @1 :UInt64;
  body :union {
    mint :group { to @2 :Data; amount @3 :UInt64; }
    account @4 :Data;                         # query
    offer @5 :OfferSpec;
    withdrawOffer @6 :UInt64;
    bid :group { orderId @7 :UInt64; offerId @8 :UInt64; pricePerStep @9 :UInt64; }
    heartbeat @10 :Void;
    redeem @11 :Voucher;
    discover @12 :OfferFilter;                # query
    order @13 :OrderSpec;
    cancelOrder @14 :UInt64;
    bids @15 :UInt64;                         # query: order id
    accept @16 :UInt64;                       # bid id
    close :group { leaseId @17 :UInt64; reason @18 :UInt8; hasVoucher @19 :Bool; voucher @20 :Voucher; }
    orders :group { renter @21 :OptionalAccount; openOnly @22 :Bool; matchingOffer @23 :UInt64; limit @24 :UInt32; }
    leases :group { renter @25 :OptionalAccount; provider @26 :OptionalAccount; openOnly @27 :Bool; limit @28 :UInt32; }
    lease @29 :UInt64;                        # query
    reputation @30 :Data;                     # query: provider key
  }
}

# What travels: the encoded MarketRequest and the account's signature over
# "meshtrain-market-request-v1" || request bytes.
struct MarketRequestEnvelope {
  request @0 :Data;
  signature @1 :Data;
}

struct MarketReply {
  ok @0 :Bool;
  errorCode @1 :Int32;      # meshtrain::ErrorCode when !ok
  errorReason @2 :Text;     # MarketError::reason(), e.g. "insufficient_funds"
  errorMessage @3 :Text;
  body :union {
    none @4 :Void;
    id @5 :UInt64;
    account @6 :Account;
    offers :group { items @7 :List(Offer); nextPageToken @8 :UInt64; total @9 :UInt64; }
    orders @10 :List(Order);
    bids @11 :List(Bid);
    lease @12 :Lease;
    leases @13 :List(Lease);
    redeem :group { paidNow @14 :UInt64; lease @15 :Lease; }
    reputation @16 :Reputation;
  }
}

# Renter -> provider daemon, once per paid step.
struct VoucherDelivery {
  voucher @0 :Voucher;
}

struct VoucherAck {
  accepted @0 :Bool;
  reason @1 :Text;          # why not, e.g. "stale_voucher", "wrong_increment", "lease_closed"
  latestStep @2 :UInt64;    # the provider's latest accepted voucher for the lease
  latestAmount @3 :UInt64;
}

# Renter -> provider daemon after a lease starts: where the provider's worker joins the job.
struct JobAttach {
  leaseId @0 :UInt64;
  coordinatorEndpoint @1 :Text;
  coordinatorKey @2 :Data;  # Ed25519, 32 bytes
  joinToken @3 :Text;       # may be empty (the provider's key is on the job's allow-list)
}

struct JobAttachAck {
  accepted @0 :Bool;
  reason @1 :Text;
}
