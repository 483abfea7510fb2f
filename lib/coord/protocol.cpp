// Cap'n Proto encoding of the coordinator messages (lib/wire/coord.capnp).
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>

#include "coord.capnp.h"
#include "meshtrain/coord.h"

namespace meshtrain::coord {
namespace {

constexpr uint64_t kTraversalLimitWords = 1 << 16;  // ~512 KiB: room for a few thousand members
constexpr int kNestingLimit = 8;
constexpr size_t kMaxMembers = 4096;

std::vector<uint8_t> to_bytes(capnp::MessageBuilder& builder) {
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

capnp::Data::Reader data_of(const PeerId& id) { return capnp::Data::Reader(id.bytes.data(), id.bytes.size()); }

PeerId peer_of(capnp::Data::Reader d, std::string_view field, std::string_view source) {
  if (d.size() != crypto::kEd25519PublicKeyBytes)
    throw ProtocolError(fmt::format("{}: field '{}' is {} bytes, expected a 32-byte peer id", source, field, d.size()));
  PeerId id;
  std::memcpy(id.bytes.data(), d.begin(), d.size());
  return id;
}

// Runs `read` on the root of `bytes`, turning every Cap'n Proto failure into a ProtocolError.
template <typename Root, typename Fn>
auto read_message(crypto::ByteSpan bytes, std::string_view what, std::string_view source, Fn read) {
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0)
    throw ProtocolError(fmt::format("{}: {} of {} bytes is not a whole number of words", source, what, bytes.size()));
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions options;
  options.traversalLimitInWords = kTraversalLimitWords;
  options.nestingLimit = kNestingLimit;
  try {
    capnp::FlatArrayMessageReader reader(words.asPtr(), options);
    return read(reader.getRoot<Root>());
  } catch (const kj::Exception& e) {
    throw ProtocolError(fmt::format("{}: undecodable {}: {}", source, what, e.getDescription().cStr()));
  }
}

std::vector<PeerId> peers_of(capnp::List<capnp::Data>::Reader list, std::string_view field, std::string_view source) {
  if (list.size() > kMaxMembers)
    throw ProtocolError(fmt::format("{}: field '{}' lists {} peers (limit {})", source, field, list.size(), kMaxMembers));
  std::vector<PeerId> out;
  for (auto d : list) out.push_back(peer_of(d, field, source));
  return out;
}

void set_peers(capnp::List<capnp::Data>::Builder list, const std::vector<PeerId>& peers) {
  for (size_t i = 0; i < peers.size(); ++i) list.set(i, data_of(peers[i]));
}

}  // namespace

std::string message_kind_name(uint16_t type) {
  switch (static_cast<MessageKind>(type)) {
    case MessageKind::QuorumRequest: return "QuorumRequest";
    case MessageKind::Quorum: return "Quorum";
    case MessageKind::Rejoin: return "Rejoin";
    case MessageKind::Abort: return "Abort";
    case MessageKind::Leave: return "Leave";
    case MessageKind::Failure: return "Failure";
    case MessageKind::Done: return "Done";
    case MessageKind::Commit: return "Commit";
    case MessageKind::Refused: return "Refused";
  }
  return fmt::format("type {}", type);
}

std::string describe_peers(const std::vector<PeerId>& peers) {
  if (peers.empty()) return "none";
  std::string out;
  for (const auto& p : peers) out += (out.empty() ? "" : ", ") + p.fingerprint();
  return out;
}

size_t Quorum::contributors() const {
  size_t n = 0;
  for (const auto& m : members) n += m.contributes ? 1 : 0;
  return n;
}

bool Quorum::contains(const PeerId& peer) const {
  for (const auto& m : members)
    if (m.id == peer) return true;
  return false;
}

const Member& Quorum::member(const PeerId& peer) const {
  for (const auto& m : members)
    if (m.id == peer) return m;
  throw InvalidArgumentError(fmt::format("peer {} is not a member of quorum {:x} (step {})", peer.fingerprint(),
                                         quorum_id, step));
}

std::vector<uint8_t> encode(const QuorumRequest& m) {
  capnp::MallocMessageBuilder b;
  auto r = b.initRoot<wire::QuorumRequest>();
  r.setStep(m.step);
  r.setHost(m.host.c_str());
  r.setPort(m.port);
  r.setHasState(m.has_state);
  r.setFailedQuorumId(m.failed_quorum_id);
  set_peers(r.initLost(m.lost.size()), m.lost);
  if (!m.join_token.empty()) r.setJoinToken(capnp::Data::Reader(m.join_token.data(), m.join_token.size()));
  if (m.state_digest) r.setStateDigest(capnp::Data::Reader(m.state_digest->data(), m.state_digest->size()));
  return to_bytes(b);
}

std::vector<uint8_t> encode(const Quorum& m) {
  capnp::MallocMessageBuilder b;
  auto q = b.initRoot<wire::Quorum>();
  q.setQuorumId(m.quorum_id);
  q.setStep(m.step);
  q.setStateSourceRank(m.state_source_rank);
  set_peers(q.initDivergent(m.divergent.size()), m.divergent);
  auto members = q.initMembers(m.members.size());
  for (size_t i = 0; i < m.members.size(); ++i) {
    members[i].setId(data_of(m.members[i].id));
    members[i].setHost(m.members[i].host.c_str());
    members[i].setPort(m.members[i].port);
    members[i].setRank(m.members[i].rank);
    members[i].setContributes(m.members[i].contributes);
  }
  return to_bytes(b);
}

std::vector<uint8_t> encode(const Rejoin& m) {
  capnp::MallocMessageBuilder b;
  auto r = b.initRoot<wire::Rejoin>();
  r.setMissedStep(m.missed_step);
  r.setNextStep(m.next_step);
  r.setReason(m.reason.c_str());
  return to_bytes(b);
}

std::vector<uint8_t> encode(const Abort& m) {
  capnp::MallocMessageBuilder b;
  auto a = b.initRoot<wire::Abort>();
  a.setQuorumId(m.quorum_id);
  a.setStep(m.step);
  set_peers(a.initLost(m.lost.size()), m.lost);
  a.setReason(m.reason.c_str());
  return to_bytes(b);
}

std::vector<uint8_t> encode(const Refusal& m) {
  capnp::MallocMessageBuilder b;
  auto r = b.initRoot<wire::Refusal>();
  r.setProblem(static_cast<uint8_t>(m.problem));
  r.setReason(m.reason.c_str());
  return to_bytes(b);
}

QuorumRequest decode_quorum_request(crypto::ByteSpan bytes, std::string_view source) {
  return read_message<wire::QuorumRequest>(bytes, "quorum request", source, [&](wire::QuorumRequest::Reader r) {
    QuorumRequest m;
    m.step = r.getStep();
    m.host = r.getHost().cStr();
    m.port = r.getPort();
    m.has_state = r.getHasState();
    m.failed_quorum_id = r.getFailedQuorumId();
    m.lost = peers_of(r.getLost(), "lost", source);
    auto token = r.getJoinToken();
    if (token.size() > kMaxJoinTokenBytes)
      throw ProtocolError(fmt::format("{}: field 'joinToken' is {} bytes (limit {})", source, token.size(),
                                      kMaxJoinTokenBytes));
    m.join_token.assign(token.begin(), token.end());
    auto digest = r.getStateDigest();
    if (digest.size() != 0 && digest.size() != crypto::kSha256Bytes)
      throw ProtocolError(fmt::format("{}: field 'stateDigest' is {} bytes, expected 0 or {}", source, digest.size(),
                                      crypto::kSha256Bytes));
    if (digest.size() != 0) std::memcpy(m.state_digest.emplace().data(), digest.begin(), digest.size());
    if (m.host.empty() || m.host.size() > 255 || m.port == 0)
      throw ProtocolError(fmt::format("{}: quorum request with bulk address '{}:{}'", source, m.host, m.port));
    return m;
  });
}

Quorum decode_quorum(crypto::ByteSpan bytes, std::string_view source) {
  return read_message<wire::Quorum>(bytes, "quorum", source, [&](wire::Quorum::Reader q) {
    Quorum m;
    m.quorum_id = q.getQuorumId();
    m.step = q.getStep();
    m.state_source_rank = q.getStateSourceRank();
    auto members = q.getMembers();
    if (members.size() == 0 || members.size() > kMaxMembers)
      throw ProtocolError(fmt::format("{}: quorum with {} members", source, members.size()));
    for (auto r : members) {
      Member mm;
      mm.id = peer_of(r.getId(), "members.id", source);
      mm.host = r.getHost().cStr();
      mm.port = r.getPort();
      mm.rank = r.getRank();
      mm.contributes = r.getContributes();
      if (mm.rank != m.members.size())
        throw ProtocolError(fmt::format("{}: quorum member {} has rank {} at position {}", source, mm.id.fingerprint(),
                                        mm.rank, m.members.size()));
      m.members.push_back(std::move(mm));
    }
    if (m.state_source_rank < -1 || m.state_source_rank >= static_cast<int32_t>(m.members.size()))
      throw ProtocolError(fmt::format("{}: quorum state source rank {} out of range", source, m.state_source_rank));
    m.divergent = peers_of(q.getDivergent(), "divergent", source);
    for (const auto& p : m.divergent)
      if (!m.contains(p))
        throw ProtocolError(fmt::format("{}: divergent peer {} is not a member of the quorum", source, p.fingerprint()));
    return m;
  });
}

Rejoin decode_rejoin(crypto::ByteSpan bytes, std::string_view source) {
  return read_message<wire::Rejoin>(bytes, "rejoin", source, [&](wire::Rejoin::Reader r) {
    return Rejoin{r.getMissedStep(), r.getNextStep(), r.getReason().cStr()};
  });
}

Abort decode_abort(crypto::ByteSpan bytes, std::string_view source) {
  return read_message<wire::Abort>(bytes, "abort", source, [&](wire::Abort::Reader a) {
    return Abort{a.getQuorumId(), a.getStep(), peers_of(a.getLost(), "lost", source), a.getReason().cStr()};
  });
}

Refusal decode_refusal(crypto::ByteSpan bytes, std::string_view source) {
  return read_message<wire::Refusal>(bytes, "refusal", source, [&](wire::Refusal::Reader r) {
    if (r.getProblem() > static_cast<uint8_t>(JoinTokenProblem::NotYetValid))
      throw ProtocolError(fmt::format("{}: refusal with unknown problem {}", source, r.getProblem()));
    return Refusal{static_cast<JoinTokenProblem>(r.getProblem()), r.getReason().cStr()};
  });
}

}  // namespace meshtrain::coord
