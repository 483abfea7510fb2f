// `meshtrain token` and `meshtrain key`.
#include "token/token_command.h"

#include <charconv>
#include <fmt/chrono.h>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string_view>
#include <string>

#include "common/flags.h"
#include "meshtrain/coord.h"

namespace meshtrain::tools {
namespace {

namespace fs = std::filesystem;

const char* const kTokenUsage = R"(usage: meshtrain token --owner-key PEM --peer KEY --job KEY --expires DURATION
                       [--label TEXT] [--out FILE]
       meshtrain token --show TOKEN|FILE [--owner KEY] [--job KEY] [--peer KEY]

Mints a join token: the job owner (--owner-key, its Ed25519 identity) admits the one peer KEY
to the job whose coordinator has the public key --job KEY, until now + DURATION. The token is
one line starting with "mtjoin-", printed on stdout or written to FILE. Give it to the peer
(its Communicator option join_token); start the coordinator with --job-owner OWNER_KEY.

--show prints a token's fields. With --owner, --job and --peer it also checks the token as the
coordinator would (signature, owner, job, peer, expiry) and exits 1 naming the problem.

KEY: 64 hex digits, a file holding one key (`meshtrain key generate --public-out`), or an
identity PEM (its public key is used).
DURATION: a whole number with a unit s, m, h or d (90m, 2h, 30d).
--label: up to 64 printable ASCII characters, shown in the coordinator's logs.

Exit codes: 0 ok; 1 the token fails the check, or a file cannot be read or written; 2 usage.
)";

const char* const kKeyUsage = R"(usage: meshtrain key generate PEM [--public-out FILE]
       meshtrain key public PEM

generate  creates a new Ed25519 identity in PEM (PKCS#8, mode 0600; an existing file is never
          overwritten) and prints its public key (64 hex digits); --public-out also writes the
          public key to FILE, usable as an allow-list, a --peer or a --job-owner file.
public    prints the public key of the identity in PEM.

Exit codes: 0 ok; 1 a file cannot be read or written; 2 usage.
)";

std::chrono::seconds parse_duration(const std::string& text) {
  long long n = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  std::string_view unit(end, text.data() + text.size() - end);
  static const std::map<std::string_view, long long> kUnits = {{"s", 1}, {"m", 60}, {"h", 3600}, {"d", 86400}};
  auto u = kUnits.find(unit);
  if (ec != std::errc() || end == text.data() || u == kUnits.end() || n <= 0 || n > (10LL * 365 * 86400) / u->second)
    throw InvalidArgumentError(
        fmt::format("--expires: '{}' is not a duration like 90m, 2h or 30d (positive, at most 10 years)", text));
  return std::chrono::seconds(n * u->second);
}

void write_line(const fs::path& path, const std::string& line) {
  std::ofstream out(path, std::ios::trunc);
  out << line << '\n';
  out.flush();
  if (!out) throw IoError(fmt::format("cannot write {}", path.string()));
}

std::string utc(coord::JoinToken::TimePoint t) {
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", fmt::gmtime(std::chrono::system_clock::to_time_t(t)));
}

int show(const Flags& flags) {
  coord::JoinToken t = coord::JoinToken::load(flags.required("--show"));
  std::printf("version  %u\nowner    %s\njob      %s\npeer     %s\nissued   %s\nexpires  %s\nlabel    %s\n",
              t.version, t.owner.hex().c_str(), t.job.hex().c_str(), t.peer.hex().c_str(), utc(t.issued).c_str(),
              utc(t.expires).c_str(), t.label.c_str());
  if (!flags.has("--owner") && !flags.has("--job") && !flags.has("--peer")) return 0;
  net::AllowList owners{coord::read_public_key(flags.required("--owner"), "--owner")};
  try {
    t.verify(owners, coord::read_public_key(flags.required("--job"), "--job"),
             coord::read_public_key(flags.required("--peer"), "--peer"));
  } catch (const coord::JoinTokenError& e) {
    std::printf("check    FAILED: %s\n", e.what());
    return 1;
  }
  std::printf("check    ok\n");
  return 0;
}

}  // namespace

int token_command(int argc, char** argv) {
  Flags flags(argc, argv, 2,
              {{"--owner-key"}, {"--peer"}, {"--job"}, {"--expires"}, {"--label"}, {"--out"}, {"--show"}, {"--owner"}},
              kTokenUsage);
  if (flags.help() || argc <= 2) {
    std::fputs(kTokenUsage, argc <= 2 ? stderr : stdout);
    return argc <= 2 ? 2 : 0;
  }
  if (!flags.positional().empty()) flags.fail(fmt::format("unexpected argument '{}'", flags.positional().front()));
  if (flags.has("--show")) return show(flags);
  auto expires_in = parse_duration(flags.required("--expires"));
  crypto::PeerId peer = coord::read_public_key(flags.required("--peer"), "--peer");
  crypto::PeerId job = coord::read_public_key(flags.required("--job"), "--job");
  crypto::Identity owner = crypto::Identity::load_pem(flags.required("--owner-key"));
  auto now = std::chrono::system_clock::now();
  coord::JoinToken token = coord::JoinToken::issue(owner, job, peer, now + expires_in, flags.get_or("--label", ""), now);
  if (auto out = flags.get("--out")) {
    write_line(*out, token.to_text());
    std::fprintf(stderr, "meshtrain token: wrote %s: %s\n", out->c_str(), token.describe().c_str());
  } else {
    std::printf("%s\n", token.to_text().c_str());
  }
  return 0;
}

int key_command(int argc, char** argv) {
  Flags flags(argc, argv, 2, {{"--public-out"}}, kKeyUsage);
  if (flags.help()) {
    std::fputs(kKeyUsage, stdout);
    return 0;
  }
  const auto& args = flags.positional();
  if (args.size() != 2 || (args[0] != "generate" && args[0] != "public"))
    flags.fail("expected `generate PEM` or `public PEM`");
  fs::path pem = args[1];
  if (args[0] == "public") {
    if (flags.has("--public-out")) flags.fail("--public-out goes with `generate`");
    std::printf("%s\n", crypto::Identity::load_pem(pem).public_key().hex().c_str());
    return 0;
  }
  std::error_code ec;
  if (fs::exists(pem, ec))
    flags.fail(fmt::format("{} exists: not overwriting an identity (`meshtrain key public {}` shows its key)",
                           pem.string(), pem.string()));
  crypto::Identity id = crypto::Identity::generate();
  id.save_pem(pem);
  if (auto out = flags.get("--public-out")) write_line(*out, id.public_key().hex());
  std::printf("%s\n", id.public_key().hex().c_str());
  return 0;
}

}  // namespace meshtrain::tools
