// Join tokens: an Ed25519 signature of the job owner over {version, job, peer, issue time,
// expiry, label}, in a fixed binary layout (big-endian integers) so that what is signed is
// exactly what travels. Layout and rules: docs/step-protocol.md ("Admission").
#include <fmt/chrono.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "meshtrain/coord.h"

namespace meshtrain::coord {
namespace {

// Signed before the fields, so a join token signature can never pass for another message
// signed with the same key.
constexpr std::string_view kSigningContext = "meshtrain join token\n";

using Seconds = std::chrono::seconds;
using SysClock = std::chrono::system_clock;

// Far beyond any real date (the year 2242), and what keeps the seconds from overflowing the
// clock's signed 64-bit nanoseconds (past 2^63 ns: the year 2262). 2^34 did not.
constexpr int64_t kMaxUnixSeconds = int64_t{1} << 33;

int64_t unix_seconds(JoinToken::TimePoint t) { return std::chrono::duration_cast<Seconds>(t.time_since_epoch()).count(); }
JoinToken::TimePoint from_unix_seconds(int64_t s) { return JoinToken::TimePoint(Seconds(s)); }

std::string utc_text(JoinToken::TimePoint t) {
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", fmt::gmtime(SysClock::to_time_t(t)));
}

void put_u64(crypto::Bytes& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}
void put_key(crypto::Bytes& out, const PeerId& key) { out.insert(out.end(), key.bytes.begin(), key.bytes.end()); }

bool printable_ascii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
}

[[noreturn]] void malformed(std::string_view source, const std::string& what) {
  throw JoinTokenError(JoinTokenProblem::Malformed, fmt::format("{}: {}", source, what));
}

}  // namespace

std::string_view join_token_problem_name(JoinTokenProblem problem) noexcept {
  switch (problem) {
    case JoinTokenProblem::Missing: return "missing";
    case JoinTokenProblem::Malformed: return "malformed";
    case JoinTokenProblem::BadSignature: return "bad signature";
    case JoinTokenProblem::WrongOwner: return "wrong owner";
    case JoinTokenProblem::WrongJob: return "wrong job";
    case JoinTokenProblem::WrongPeer: return "wrong peer";
    case JoinTokenProblem::Expired: return "expired";
    case JoinTokenProblem::NotYetValid: return "not yet valid";
  }
  return "unknown problem";
}

JoinTokenError::JoinTokenError(JoinTokenProblem p, const std::string& detail)
    : AuthError(fmt::format("join token {}: {}", join_token_problem_name(p), detail)), problem(p), detail(detail) {}

JoinToken JoinToken::issue(const crypto::Identity& owner, const PeerId& job, const PeerId& peer, TimePoint expires,
                           std::string label, TimePoint issued_at) {
  if (label.size() > kMaxJoinTokenLabelBytes || !printable_ascii(label))
    throw InvalidArgumentError(fmt::format("join token label '{}': at most {} printable ASCII characters", label,
                                           kMaxJoinTokenLabelBytes));
  JoinToken t;
  t.owner = owner.public_key();
  t.job = job;
  t.peer = peer;
  t.issued = std::chrono::floor<Seconds>(issued_at);
  t.expires = std::chrono::floor<Seconds>(expires);
  if (t.expires <= t.issued)
    throw InvalidArgumentError(fmt::format("join token expiry {} is not after its issue time {}", utc_text(t.expires),
                                           utc_text(t.issued)));
  if (unix_seconds(t.issued) < 0 || unix_seconds(t.expires) > kMaxUnixSeconds)
    throw InvalidArgumentError(fmt::format("join token times {} to {}: outside 1970 to {}", utc_text(t.issued),
                                           utc_text(t.expires), utc_text(from_unix_seconds(kMaxUnixSeconds))));
  t.label = std::move(label);
  t.signature = owner.sign(t.signed_bytes());
  return t;
}

crypto::Bytes JoinToken::signed_bytes() const {
  crypto::Bytes out(kSigningContext.begin(), kSigningContext.end());
  crypto::Bytes body = encode();
  out.insert(out.end(), body.begin(), body.end() - crypto::kEd25519SignatureBytes);
  return out;
}

crypto::Bytes JoinToken::encode() const {
  crypto::Bytes out;
  out.reserve(kMinJoinTokenBytes + label.size());
  out.push_back(version);
  put_key(out, owner);
  put_key(out, job);
  put_key(out, peer);
  put_u64(out, static_cast<uint64_t>(unix_seconds(issued)));
  put_u64(out, static_cast<uint64_t>(unix_seconds(expires)));
  out.push_back(static_cast<uint8_t>(std::min(label.size(), kMaxJoinTokenLabelBytes)));
  out.insert(out.end(), label.begin(), label.begin() + static_cast<ptrdiff_t>(std::min(label.size(), kMaxJoinTokenLabelBytes)));
  out.insert(out.end(), signature.begin(), signature.end());
  return out;
}

std::string JoinToken::to_text() const { return std::string(kJoinTokenTextPrefix) + crypto::to_hex(encode()); }

JoinToken JoinToken::decode(crypto::ByteSpan bytes, std::string_view source) {
  if (bytes.size() < kMinJoinTokenBytes || bytes.size() > kMaxJoinTokenBytes)
    malformed(source, fmt::format("{} bytes, a token has {}..{}", bytes.size(), kMinJoinTokenBytes, kMaxJoinTokenBytes));
  const uint8_t* p = bytes.data();
  JoinToken t;
  t.version = *p++;
  if (t.version != kJoinTokenVersion)
    malformed(source, fmt::format("version {} (this build reads version {})", t.version, kJoinTokenVersion));
  for (PeerId* key : {&t.owner, &t.job, &t.peer}) {
    std::memcpy(key->bytes.data(), p, key->bytes.size());
    p += key->bytes.size();
  }
  int64_t issued = static_cast<int64_t>(get_u64(p));
  int64_t expires = static_cast<int64_t>(get_u64(p + 8));
  p += 16;
  if (issued < 0 || issued > kMaxUnixSeconds || expires < 0 || expires > kMaxUnixSeconds)
    malformed(source, fmt::format("issue time {} or expiry {} is out of range", issued, expires));
  t.issued = from_unix_seconds(issued);
  t.expires = from_unix_seconds(expires);
  size_t label_bytes = *p++;
  if (bytes.size() != kMinJoinTokenBytes + label_bytes)
    malformed(source, fmt::format("{} bytes, but a token with a {}-byte label has {}", bytes.size(), label_bytes,
                                  kMinJoinTokenBytes + label_bytes));
  t.label.assign(reinterpret_cast<const char*>(p), label_bytes);
  p += label_bytes;
  if (!printable_ascii(t.label)) malformed(source, "the label is not printable ASCII");
  std::memcpy(t.signature.data(), p, t.signature.size());
  return t;
}

JoinToken JoinToken::from_text(std::string_view text, std::string_view source) {
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!text.empty() && space(text.front())) text.remove_prefix(1);
  while (!text.empty() && space(text.back())) text.remove_suffix(1);
  if (text.size() > kMaxJoinTokenTextBytes)
    malformed(source, fmt::format("{} characters (a token has at most {})", text.size(), kMaxJoinTokenTextBytes));
  if (!text.starts_with(kJoinTokenTextPrefix))
    malformed(source, fmt::format("does not start with '{}'", kJoinTokenTextPrefix));
  text.remove_prefix(kJoinTokenTextPrefix.size());
  crypto::Bytes bytes;
  try {
    bytes = crypto::from_hex(text, "token");
  } catch (const InvalidArgumentError& e) {
    malformed(source, e.what());
  }
  return decode(bytes, source);
}

JoinToken JoinToken::load(std::string_view text_or_path) {
  if (text_or_path.starts_with(kJoinTokenTextPrefix)) return from_text(text_or_path, "the token given");
  std::filesystem::path path(text_or_path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("join token file {}: cannot open it (nor is it a token, which starts with '{}')",
                                     path.string(), kJoinTokenTextPrefix));
  // Reads past the limit, so an oversized file is reported, not silently cut.
  std::string text(kMaxJoinTokenTextBytes + 64, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  return from_text(text, fmt::format("join token file {}", path.string()));
}

void JoinToken::verify(const net::AllowList& owners, const PeerId& job_key, const PeerId& joining_peer,
                       TimePoint now) const {
  if (!crypto::is_valid_signature(owner, signed_bytes(), signature))
    throw JoinTokenError(JoinTokenProblem::BadSignature,
                         fmt::format("{}: the signature does not verify with the owner key it names (altered or "
                                     "damaged token)", describe()));
  if (!owners.contains(owner))
    throw JoinTokenError(JoinTokenProblem::WrongOwner,
                         fmt::format("{}: signed by {}, which is not an owner of this job (owners: {})", describe(),
                                     owner.fingerprint(),
                                     describe_peers(std::vector<PeerId>(owners.peers().begin(), owners.peers().end()))));
  if (job != job_key)
    throw JoinTokenError(JoinTokenProblem::WrongJob,
                         fmt::format("{}: issued for the job of coordinator {}, this is coordinator {}", describe(),
                                     job.fingerprint(), job_key.fingerprint()));
  if (peer != joining_peer)
    throw JoinTokenError(JoinTokenProblem::WrongPeer, fmt::format("{}: presented by peer {}", describe(),
                                                                  joining_peer.fingerprint()));
  if (now >= expires)
    throw JoinTokenError(JoinTokenProblem::Expired, fmt::format("{}: it is now {}", describe(), utc_text(now)));
  if (issued > now + kJoinTokenClockSkew)
    throw JoinTokenError(JoinTokenProblem::NotYetValid,
                         fmt::format("{}: issued at {}, but it is now {} here (clocks more than {} s apart?)",
                                     describe(), utc_text(issued), utc_text(now), kJoinTokenClockSkew.count()));
}

std::string JoinToken::describe() const {
  return fmt::format("token {}for peer {} of job {} signed by {}, expires {}",
                     label.empty() ? std::string() : fmt::format("'{}' ", label), peer.fingerprint(),
                     job.fingerprint(), owner.fingerprint(), utc_text(expires));
}

PeerId read_public_key(std::string_view hex_or_path, std::string_view what) {
  if (hex_or_path.size() == 2 * crypto::kEd25519PublicKeyBytes &&
      std::all_of(hex_or_path.begin(), hex_or_path.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }))
    return PeerId::from_hex(hex_or_path, what);
  std::filesystem::path path(hex_or_path);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw InvalidArgumentError(fmt::format("{}: '{}' is neither 64 hex digits nor a key file", what, hex_or_path));
  {
    std::ifstream in(path);
    std::string first_line;
    std::getline(in, first_line);
    if (first_line.starts_with("-----BEGIN")) return crypto::Identity::load_pem(path).public_key();
  }
  net::AllowList keys = net::AllowList::load(path);
  if (keys.peers().size() != 1)
    throw InvalidArgumentError(fmt::format("{}: {} holds {} keys, expected exactly one", what, path.string(),
                                           keys.peers().size()));
  return *keys.peers().begin();
}

}  // namespace meshtrain::coord
