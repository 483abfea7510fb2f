// `meshtrain market ...` against a real market and provider: tables, --json, exit codes.
#include <gtest/gtest.h>

#include "core/json.h"
#include "market/market_world.h"

using namespace meshtrain;
using namespace meshtrain::market;
using namespace meshtrain::test_support;
using namespace std::chrono_literals;
namespace json = meshtrain::json;

namespace {

struct CliRun {
  int code;
  std::string out;  // stdout
  std::string err;
};

CliRun run_cli(const MarketWorld& world, std::vector<std::string> args) {
  std::string cmd = std::string("exec ") + MESHTRAIN_CLI_BINARY;
  for (const auto& a : args) cmd += " '" + a + "'";
  auto out = world.dir() / "cli.out", err = world.dir() / "cli.err";
  cmd += " > '" + out.string() + "' 2> '" + err.string() + "'";
  ChildProcess p({"/bin/sh", "-c", cmd});
  auto code = p.wait(60s);
  EXPECT_TRUE(code.has_value());
  auto slurp = [](const std::filesystem::path& f) {
    std::ifstream in(f);
    return std::string((std::istreambuf_iterator<char>(in)), {});
  };
  return {code.value_or(-1), slurp(out), slurp(err)};
}

}  // namespace

TEST(MarketCli, BalanceMintOffersRentCloseAndCost) {
  MarketWorld world;
  Endpoint provider = world.start_provider(0, 250);
  auto renter = crypto::Identity::generate();
  std::vector<std::string> conn = {"--market", world.market().endpoint, "--market-key", world.market().key.hex(),
                                   "--key", world.save_key(renter, "renter").string()};
  auto with = [&](std::vector<std::string> args) {
    args.insert(args.end(), conn.begin(), conn.end());
    return run_cli(world, args);
  };

  CliRun minted = with({"market", "mint", "5000", "--json"});
  ASSERT_EQ(minted.code, 0) << minted.err;
  auto account = json::parse(minted.out, "mint output");
  EXPECT_EQ(json::Field(account, "mint").at("balance").u64(), 5000u);
  EXPECT_EQ(json::Field(account, "mint").at("account").str(), renter.public_key().hex());

  // The provider's offer shows up (it publishes within its first poll).
  CliRun offers;
  for (int i = 0; i < 100; ++i) {
    offers = with({"market", "offers", "--gpu", "L4-24GB", "--json"});
    if (offers.code == 0 && json::Field(json::parse(offers.out, "offers"), "offers").at("total").u64() == 1) break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(offers.code, 0) << offers.err;
  auto page = json::parse(offers.out, "offers output");
  json::Field first = json::Field(page, "offers").at("offers").at(size_t{0});
  EXPECT_EQ(first.at("price_per_step").u64(), 250u);
  EXPECT_EQ(first.at("provider").str(), provider.key.hex());
  CliRun table = with({"market", "offers"});
  EXPECT_EQ(table.code, 0);
  EXPECT_NE(table.out.find("L4-24GB"), std::string::npos) << table.out;

  CliRun rented = with({"market", "rent", "--count", "1", "--escrow", "2000", "--spend-limit", "2000", "--json"});
  ASSERT_EQ(rented.code, 0) << rented.err;
  auto leases = json::parse(rented.out, "rent output");
  ASSERT_EQ(json::Field(leases, "rent").array_size(), 1u);
  uint64_t lease_id = json::Field(leases, "rent").at(size_t{0}).at("id").u64();
  CliRun balance = with({"market", "balance"});
  EXPECT_EQ(balance.code, 0);
  EXPECT_NE(balance.out.find("escrowed 2000"), std::string::npos) << balance.out;

  CliRun listed = with({"market", "leases", "--open"});
  EXPECT_NE(listed.out.find(std::to_string(lease_id)), std::string::npos) << listed.out;
  CliRun closed = with({"market", "close", std::to_string(lease_id), "--json"});
  ASSERT_EQ(closed.code, 0) << closed.err;
  EXPECT_EQ(json::Field(json::parse(closed.out, "close"), "close").at(size_t{0}).at("state").str(), "closed");
  auto after = json::parse(with({"market", "balance", "--json"}).out, "balance");
  EXPECT_EQ(json::Field(after, "balance").at("balance").u64(), 5000u);  // escrow refunded, nothing paid

  // Refusals: a clear message and a non-zero exit, never a crash.
  CliRun twice = with({"market", "close", std::to_string(lease_id)});
  EXPECT_EQ(twice.code, 1);
  EXPECT_NE(twice.err.find("lease"), std::string::npos) << twice.err;
  CliRun usage = run_cli(world, {"market", "offers", "--bogus"});
  EXPECT_EQ(usage.code, 2);
  EXPECT_NE(usage.err.find("unknown flag '--bogus'"), std::string::npos) << usage.err;
  CliRun no_market = run_cli(world, {"market", "balance"});
  EXPECT_EQ(no_market.code, 2);
  EXPECT_NE(no_market.err.find("--key"), std::string::npos) << no_market.err;

  CliRun cost = run_cli(world, {"market", "cost", "--price-per-step", "120", "--steps", "1000", "--peers", "4",
                                "--samples-per-step", "256", "--json"});
  ASSERT_EQ(cost.code, 0) << cost.err;
  auto c = json::parse(cost.out, "cost");
  EXPECT_EQ(json::Field(c, "cost").at("per_step").u64(), 480u);
  EXPECT_EQ(json::Field(c, "cost").at("total").u64(), 480000u);
}
