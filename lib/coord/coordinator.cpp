// The per-job coordinator: membership from QuorumRequests and heartbeats, one quorum per step,
// stragglers, joiners, failed attempts and their retries. The rules are in docs/step-protocol.md;
// the comments below name them (R1..R10).
#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <set>

#include "meshtrain/coord.h"

namespace meshtrain::coord {
namespace {

using namespace std::chrono_literals;

constexpr auto kMaxSlice = 100ms;        // timers (drops, quorum timeouts) run at least this often
constexpr uint64_t kKeepSteps = 16;      // formed attempts kept for straggler / failure lookups

std::string fp(const PeerId& p) { return p.fingerprint(); }

long long ms_of(Clock::duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); }

// A first quorum id that differs from every id a previous run of the coordinator handed out:
// the wall clock in nanoseconds grows faster than any coordinator forms quorums.
uint64_t initial_quorum_id() {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch());
  uint64_t id = static_cast<uint64_t>(ns.count());
  if (id == 0) {
    crypto::random_bytes({reinterpret_cast<uint8_t*>(&id), sizeof id});
    id |= 1;
  }
  return id;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::string CoordinatorStatus::to_json() const {
  return fmt::format(
      "{{\"members\":{},\"live_peers\":{},\"last_step\":{},\"last_quorum_id\":\"{:016x}\",\"last_quorum_size\":{},"
      "\"quorums_formed\":{},\"attempts_aborted\":{},\"members_dropped\":{},\"joins_admitted\":{},\"refused\":{},\"state_divergences\":{}}}",
      members, live_peers, last_step, last_quorum_id, last_quorum_size, quorums_formed, attempts_aborted,
      members_dropped, joins_admitted, refused, state_divergences);
}

std::string CoordinatorStatus::to_text() const {
  std::string quorum = quorums_formed == 0
                           ? std::string("no quorum yet")
                           : fmt::format("step {} · quorum {} peers (id {:016x})", last_step, last_quorum_size,
                                         last_quorum_id);
  std::string admission = joins_admitted == 0 && refused == 0
                              ? std::string()
                              : fmt::format(" · admitted by token {} · refused {}", joins_admitted, refused);
  std::string divergence = state_divergences == 0 ? std::string()
                                                 : fmt::format(" · STATE DIVERGED {}", state_divergences);
  return fmt::format("members {} · {} · formed {} · aborted {} · dropped {}{}{}", members, quorum, quorums_formed,
                     attempts_aborted, members_dropped, admission, divergence);
}

// ---------------------------------------------------------------------------------------------

struct Coordinator::Impl {
  struct MemberInfo {
    std::string host;
    uint16_t port = 0;
  };
  // A peer not on the allow-list, admitted by a join token until the token expires.
  struct TokenAdmission {
    JoinToken::TimePoint expires;
    std::string label;
  };
  // Requests waiting for the quorum of one step.
  struct StepWait {
    std::map<PeerId, QuorumRequest> requests;  // ordered by PeerId: rank order
    Clock::time_point first_at;                // first pending request of this wait
    std::set<PeerId> excused;                  // reported lost: not waited for (R5)
    bool logged_min_peers = false;
  };
  // One formed attempt of a step.
  struct Attempt {
    Quorum quorum;
    bool aborted = false;
    bool committed = false;  // every member reported Done and got Commit
    bool moved_on = false;   // some member sent a request since it formed: the attempt ended
    std::set<PeerId> done;
    Abort verdict;           // what the members were told when it was aborted
    bool in_flight() const { return !aborted && !committed && !moved_on; }
  };

  CoordinatorOptions options;
  net::ControlServer server;
  std::string endpoint;
  Clock::time_point started = Clock::now();

  std::map<PeerId, MemberInfo> members;                 // registered (R1)
  std::set<PeerId> left;                                // sent Leave: not waited for until they ask again
  std::map<PeerId, Clock::time_point> reported_lost;    // named lost by an abort, and when
  std::map<PeerId, TokenAdmission> token_admitted;
  std::map<PeerId, std::string> last_refusal;           // per peer: logged at warn level once per reason
  std::map<uint64_t, StepWait> waiting;                 // step -> pending requests (R2)
  std::map<uint64_t, Attempt> attempts;                 // quorum id -> attempt
  std::map<uint64_t, uint64_t> current;                 // step -> quorum id of its latest attempt
  std::optional<uint64_t> latest_step;                  // step of the last quorum formed
  uint64_t next_quorum_id = initial_quorum_id();

  mutable std::mutex status_mutex;  // guards `snapshot`: status() may be called from any thread
  CoordinatorStatus snapshot;
  CoordinatorStatus counters;  // the poll thread's copy

  // Peers with a join token connect before they are admitted, so with job owners the control
  // server lets any key connect and admission is decided here, per message.
  static CoordinatorOptions with_admission(CoordinatorOptions o) {
    if (!o.job_owners.peers().empty()) o.control.admit_any_key = true;
    return o;
  }

  Impl(const crypto::Identity& self, CoordinatorOptions o)
      : options(with_admission(std::move(o))), server(self, options.allowed, options.bind_endpoint, options.control) {
    if (options.min_peers == 0) options.min_peers = 1;
    endpoint = server.endpoint();
    log::info("coord", "coordinator {} on {}: {} allowed peers, {}, min_peers {}, quorum timeout {} ms, heartbeat "
              "timeout {} ms, startup grace {} ms",
              self.public_key().fingerprint(), endpoint, options.allowed.peers().size(),
              options.job_owners.peers().empty()
                  ? std::string("no join tokens")
                  : fmt::format("join tokens of {}", describe_peers(std::vector<PeerId>(
                                                         options.job_owners.peers().begin(), options.job_owners.peers().end()))),
              options.min_peers, options.quorum_timeout.count(), options.heartbeat_timeout.count(),
              options.startup_grace.count());
  }

  // --- sending --------------------------------------------------------------------------------

  // `wait` false: dropped when the peer's queue is full (replies to peers that may not read).
  bool send_raw(const PeerId& to, MessageKind kind, uint64_t quorum_id, uint64_t step, crypto::ByteSpan payload,
                bool wait = true) {
    net::MessageHeader h;
    h.type = static_cast<uint16_t>(kind);
    h.quorum_id = quorum_id;
    h.step = step;
    try {
      if (wait) {
        server.send(to, h, payload);
      } else if (!server.try_send(to, h, payload)) {
        log::debug("coord", "dropped {} to {}: its queue is full", message_kind_name(static_cast<uint16_t>(kind)),
                   fp(to));
        return false;
      }
      return true;
    } catch (const Error& e) {
      log::warn("coord", "cannot send {} to {}: {}", message_kind_name(static_cast<uint16_t>(kind)), fp(to), e.what());
      return false;
    }
  }

  template <typename M>
  bool send_to(const PeerId& to, MessageKind kind, uint64_t quorum_id, uint64_t step, const M& message) {
    auto payload = encode(message);
    return send_raw(to, kind, quorum_id, step, payload);
  }


  void send_rejoin(const PeerId& to, uint64_t missed, uint64_t next, std::string reason) {
    log::info("coord", "{} missed step {}: rejoin at step {} ({})", fp(to), missed, next, reason);
    send_to(to, MessageKind::Rejoin, 0, missed, Rejoin{missed, next, std::move(reason)});
  }

  // --- bookkeeping ----------------------------------------------------------------------------

  // Removes `peer`'s pending request (from every step but `keep_step`, when given).
  void forget_pending(const PeerId& peer, std::optional<uint64_t> keep_step = std::nullopt) {
    for (auto it = waiting.begin(); it != waiting.end();) {
      if (it->first != keep_step) it->second.requests.erase(peer);
      it = it->second.requests.empty() ? waiting.erase(it) : std::next(it);
    }
  }

  Attempt* current_attempt(uint64_t step) {
    auto c = current.find(step);
    if (c == current.end()) return nullptr;
    auto a = attempts.find(c->second);
    return a == attempts.end() ? nullptr : &a->second;
  }

  // Marks `a` aborted and sends Abort to its members, except `except` when set. R5.
  void abort_attempt(Attempt& a, const PeerId* except, const std::vector<PeerId>& lost, const std::string& reason) {
    a.aborted = true;
    a.verdict = Abort{a.quorum.quorum_id, a.quorum.step, lost, reason};
    // Only the attempt's members: a report may name up to 4096 ids of its author's choosing.
    for (const auto& p : lost)
      if (a.quorum.contains(p)) reported_lost[p] = Clock::now();
    ++counters.attempts_aborted;
    log::warn("coord", "quorum {:016x} (step {}, {} peers) aborted: {}; lost: {}", a.quorum.quorum_id, a.quorum.step,
              a.quorum.members.size(), reason, describe_peers(lost));
    for (const auto& member : a.quorum.members)
      if (!except || member.id != *except)
        send_to(member.id, MessageKind::Abort, a.quorum.quorum_id, a.quorum.step, a.verdict);
  }

  // Removes a member (silent: counted as dropped; or left). An attempt still in flight cannot
  // complete without it: its other members are told now rather than left to their transport
  // timeouts.
  void remove_member(const PeerId& peer, const std::string& why) {
    members.erase(peer);
    reported_lost.erase(peer);  // not waited for as a non-member anyway
    forget_pending(peer);
    ++counters.members_dropped;
    for (auto& [id, a] : attempts) {
      if (!a.in_flight() || !a.quorum.contains(peer) || current_attempt(a.quorum.step) != &a) continue;
      abort_attempt(a, &peer, {peer}, fmt::format("member {} {}", fp(peer), why));
    }
  }

  void drop_member(const PeerId& peer, const std::string& why) {
    log::warn("coord", "member {} dropped: {}", fp(peer), why);
    remove_member(peer, why);
  }

  // R1: members silent for heartbeat_timeout are dropped.
  void drop_silent(Clock::time_point now) {
    std::vector<std::pair<PeerId, long long>> silent;
    for (const auto& [peer, info] : members) {
      auto seen = server.last_seen(peer);
      if (!seen || now - *seen > options.heartbeat_timeout)
        silent.emplace_back(peer, seen ? ms_of(now - *seen) : -1);
    }
    for (const auto& [peer, ms] : silent)
      drop_member(peer, fmt::format("silent for {} ms (heartbeat timeout {} ms)", ms, options.heartbeat_timeout.count()));
    // A peer that left stays excused while it is still connected; forget it once silent.
    for (auto it = left.begin(); it != left.end();) {
      auto seen = server.last_seen(*it);
      it = !seen || now - *seen > options.heartbeat_timeout ? left.erase(it) : std::next(it);
    }
  }

  // --- admission ------------------------------------------------------------------------------

  // On the allow-list, or holding a join token that has not expired.
  bool admitted(const PeerId& peer) const {
    if (options.allowed.contains(peer)) return true;
    auto it = token_admitted.find(peer);
    return it != token_admitted.end() && std::chrono::system_clock::now() < it->second.expires;
  }

  // Counts, logs (at warn level once per peer and reason) and tells the peer why.
  void refuse(const PeerId& peer, uint16_t kind, uint64_t step, const JoinTokenError& why) {
    const std::string reason = why.what();
    ++counters.refused;
    if (last_refusal.size() > 4096) last_refusal.clear();  // bounded against floods of fresh keys
    auto [it, fresh] = last_refusal.try_emplace(peer);
    if (fresh || it->second != reason) {
      log::warn("coord", "refused {} from {}: {}", message_kind_name(kind), fp(peer), reason);
      it->second = reason;
    } else {
      log::debug("coord", "refused {} from {} again: {}", message_kind_name(kind), fp(peer), reason);
    }
    // Never waits: a key that sends and never reads would otherwise stall this thread for 2 s
    // per refusal once its queue is full, and the members' heartbeats with it.
    send_raw(peer, MessageKind::Refused, 0, step, encode(Refusal{why.problem, why.detail}), /*wait=*/false);
  }

  // Whether a QuorumRequest from `from` may register it: listed peers always, others with a
  // valid join token for their own key (R9).
  bool admit_requester(const PeerId& from, const QuorumRequest& r, const std::string& source) {
    if (options.allowed.contains(from)) return true;
    auto now = std::chrono::system_clock::now();
    try {
      if (r.join_token.empty()) {
        if (admitted(from)) return true;  // admitted earlier by this coordinator, still valid
        throw JoinTokenError(JoinTokenProblem::Missing,
                             fmt::format("{} is not on the job's allow-list and sent no join token", source));
      }
      JoinToken token = JoinToken::decode(r.join_token, source);
      token.verify(options.job_owners, server.id(), from, now);
      auto previous = token_admitted.find(from);
      bool fresh = previous == token_admitted.end() || now >= previous->second.expires;
      token_admitted[from] = TokenAdmission{token.expires, token.label};
      if (fresh) {
        ++counters.joins_admitted;
        last_refusal.erase(from);
        server.allow(from);
        log::info("coord", "peer {} admitted by join {}", fp(from), token.describe());
      }
      return true;
    } catch (const JoinTokenError& e) {
      token_admitted.erase(from);
      refuse(from, static_cast<uint16_t>(MessageKind::QuorumRequest), r.step, e);
      // A member whose token expired (or whose new one is invalid) leaves the job here.
      if (members.count(from)) drop_member(from, e.what());
      return false;
    }
  }

  // --- messages -------------------------------------------------------------------------------

  void handle(const net::Message& m) {
    const PeerId& from = m.header.sender;
    std::string source = fmt::format("peer {}", fp(from));
    const auto kind = static_cast<MessageKind>(m.header.type);
    // Only a QuorumRequest can admit a peer. A member whose token expired may still finish the
    // step it is in (Done, Failure, Leave).
    if (kind != MessageKind::QuorumRequest && !admitted(from) && !members.count(from)) {
      refuse(from, m.header.type, m.header.step,
             JoinTokenError(JoinTokenProblem::Missing,
                            fmt::format("{} is not admitted to this job: its first message must be a QuorumRequest "
                                        "from a key on the allow-list or with a valid join token", source)));
      return;
    }
    switch (kind) {
      case MessageKind::QuorumRequest: {
        QuorumRequest r;
        try {
          r = decode_quorum_request(m.payload, source);
        } catch (const ProtocolError& e) {
          if (!admitted(from)) {
            refuse(from, m.header.type, m.header.step, JoinTokenError(JoinTokenProblem::Malformed, e.what()));
            return;
          }
          log::warn("coord", "ignored a quorum request: {}", e.what());
          return;
        }
        if (!admit_requester(from, r, source)) return;
        on_request(from, r);
        return;
      }
      case MessageKind::Leave:
        left.insert(from);
        if (members.count(from)) {
          log::info("coord", "member {} left", fp(from));
          remove_member(from, "left the job");
        }
        return;
      case MessageKind::Failure: {
        Abort report;
        try {
          report = decode_abort(m.payload, source);
        } catch (const ProtocolError& e) {
          log::warn("coord", "ignored a failure report: {}", e.what());
          return;
        }
        on_failure(from, report);
        return;
      }
      case MessageKind::Done:
        on_done(from, m.header.quorum_id, m.header.step);
        return;
      case MessageKind::Quorum:
      case MessageKind::Rejoin:
      case MessageKind::Abort:
      case MessageKind::Commit:
      case MessageKind::Refused:
        log::warn("coord", "ignored a {} message from {}: only the coordinator sends those",
                  message_kind_name(m.header.type), source);
        return;
    }
    log::warn("coord", "ignored a message of unknown kind {} from {}", m.header.type, source);
  }

  // Failure: an operation of attempt `report.quorum_id` failed at `from`. The attempt is aborted
  // and every member, the reporter included (it waits for the verdict), gets the Abort.
  void on_failure(const PeerId& from, const Abort& report) {
    auto it = attempts.find(report.quorum_id);
    if (it == attempts.end()) {
      // From before a restart, or long forgotten: the reporter retries the step either way.
      log::info("coord", "{} reports failed quorum {:016x} (step {}), unknown here: told to retry", fp(from),
                report.quorum_id, report.step);
      send_to(from, MessageKind::Abort, report.quorum_id, report.step,
              Abort{report.quorum_id, report.step, report.lost,
                    fmt::format("quorum unknown to the coordinator (restarted?); reported: {}", report.reason)});
      return;
    }
    Attempt& a = it->second;
    if (!a.quorum.contains(from)) {
      log::warn("coord", "{} reports failed quorum {:016x} but is not a member of it; ignored", fp(from),
                report.quorum_id);
      return;
    }
    if (a.committed) {
      log::warn("coord", "{} reports failed quorum {:016x} after it was committed; ignored", fp(from), report.quorum_id);
      return;
    }
    if (a.aborted) {
      send_to(from, MessageKind::Abort, a.quorum.quorum_id, a.quorum.step, a.verdict);  // idempotent
      return;
    }
    abort_attempt(a, nullptr, report.lost,
                  fmt::format("reported by {}: {}", fp(from), report.reason.empty() ? "failed" : report.reason));
  }

  // Done: `from` finished the reduction of attempt `quorum_id`. Commit once all members did.
  void on_done(const PeerId& from, uint64_t quorum_id, uint64_t step) {
    auto it = attempts.find(quorum_id);
    if (it == attempts.end()) {
      // Nobody can vouch for the others any more: the step is retried, never half applied.
      log::info("coord", "{} finished quorum {:016x} (step {}), unknown here: told to retry", fp(from), quorum_id,
                step);
      send_to(from, MessageKind::Abort, quorum_id, step,
              Abort{quorum_id, step, {}, "quorum unknown to the coordinator (restarted?): retry the step"});
      return;
    }
    Attempt& a = it->second;
    if (!a.quorum.contains(from)) {
      log::warn("coord", "{} reports done for quorum {:016x} but is not a member of it; ignored", fp(from), quorum_id);
      return;
    }
    if (a.aborted) {
      send_to(from, MessageKind::Abort, a.quorum.quorum_id, a.quorum.step, a.verdict);
      return;
    }
    a.done.insert(from);
    if (a.committed) {
      send_raw(from, MessageKind::Commit, a.quorum.quorum_id, a.quorum.step, {});
      return;
    }
    if (a.done.size() < a.quorum.members.size()) return;
    a.committed = true;
    log::debug("coord", "quorum {:016x} (step {}) committed", quorum_id, a.quorum.step);
    for (const auto& m : a.quorum.members) send_raw(m.id, MessageKind::Commit, a.quorum.quorum_id, a.quorum.step, {});
  }

  void on_request(const PeerId& from, const QuorumRequest& r) {
    auto now = Clock::now();
    const uint64_t s = r.step;
    // R1: (re)register.
    auto [it, added] = members.insert_or_assign(from, MemberInfo{r.host, r.port});
    (void)it;
    left.erase(from);
    if (added) log::info("coord", "member {} registered (bulk {}:{})", fp(from), r.host, r.port);
    log::debug("coord", "{} asks for step {} (state {}, failed quorum {:016x}, lost {})", fp(from), s, r.has_state,
               r.failed_quorum_id, describe_peers(r.lost));

    // A request from a member of an attempt for another step, or naming the attempt failed,
    // means that attempt ended for it. A repeat for the attempt's own step does not (its
    // request crossed the quorum, R5 below): the attempt stays in flight, so that the member
    // dying later still aborts it for the others.
    for (auto& [id, a] : attempts)
      if (!a.moved_on && a.quorum.contains(from) && (a.quorum.step != s || r.failed_quorum_id == id))
        a.moved_on = true;

    bool failure_handled = false;
    std::vector<PeerId> excused;
    if (r.failed_quorum_id != 0) {
      auto a = attempts.find(r.failed_quorum_id);
      if (a == attempts.end()) {
        log::info("coord", "{} reports failed quorum {:016x}, unknown here (forgotten or from before a restart); "
                  "handling it as a request for step {}", fp(from), r.failed_quorum_id, s);
      } else if (!a->second.quorum.contains(from)) {
        log::warn("coord", "{} reports failed quorum {:016x} but is not a member of it; ignoring the report",
                  fp(from), r.failed_quorum_id);
      } else {
        Attempt& attempt = a->second;
        if (attempt.quorum.step != s)
          log::warn("coord", "{} reports failed quorum {:016x} of step {} and asks for step {}", fp(from),
                    r.failed_quorum_id, attempt.quorum.step, s);
        if (attempt.committed) {
          log::warn("coord", "{} reports failed quorum {:016x} after it was committed; handled as a plain request",
                    fp(from), r.failed_quorum_id);
        } else {
          if (!attempt.aborted)
            abort_attempt(attempt, &from, r.lost, fmt::format("member {} reported the attempt failed", fp(from)));
          failure_handled = true;
          excused = r.lost;
        }
      }
    }

    if (Attempt* cur = current_attempt(s); cur && !cur->aborted) {
      if (cur->committed && cur->quorum.contains(from)) {
        // It already applied (or was told to apply) this step: asking again means it lost it.
        send_rejoin(from, s, s + 1,
                    fmt::format("step {} was committed (quorum {:016x}); it cannot be redone", s, cur->quorum.quorum_id));
        forget_pending(from);
        return;
      }
      if (!cur->quorum.contains(from)) {
        // R4: the quorum of this step formed without it.
        send_rejoin(from, s, s + 1,
                    fmt::format("the quorum for step {} (id {:016x}) formed without you", s, cur->quorum.quorum_id));
        forget_pending(from);
        return;
      }
      if (failure_handled && r.failed_quorum_id != cur->quorum.quorum_id) {
        log::warn("coord", "{} reports an older attempt of step {} failed but is a member of the current one "
                  "({:016x}); ignoring the stale report", fp(from), s, cur->quorum.quorum_id);
        return;
      }
      // R5: a member asking again for the step of its open attempt, without reporting a
      // failure, has not received the quorum (lost message, or its request crossed it): send
      // it again. Failures are reported explicitly (Failure, or failed_quorum_id).
      send_to(from, MessageKind::Quorum, cur->quorum.quorum_id, s, cur->quorum);
      return;
    } else if (!failure_handled && latest_step && s < *latest_step) {
      Attempt* latest = current_attempt(*latest_step);
      if (!latest || !latest->quorum.contains(from)) {
        // R4: behind the job.
        send_rejoin(from, s, *latest_step + 1,
                    fmt::format("the job is at step {}; step {} is over", *latest_step, s));
        forget_pending(from);
        return;
      }
    }

    // Pending for step s (one pending request per peer; a repeated one keeps the wait's timer).
    forget_pending(from, s);
    auto [w, fresh] = waiting.try_emplace(s);
    if (fresh) w->second.first_at = now;
    w->second.requests[from] = r;
    for (const auto& p : excused) w->second.excused.insert(p);
  }

  // --- forming quorums ------------------------------------------------------------------------

  // Peers a quorum for `step` waits for (R2): `candidates` (live registered members and live
  // peers seen but not registered, i.e. members after a restart; during the startup grace also
  // every allowed peer not heard from yet), minus those that left, those reported lost (R5),
  // and those already waiting for another step.
  // A peer an abort named lost is not waited for by later steps either, until it is heard from
  // again (a live member heartbeats every heartbeat interval; a dead one never does), so a
  // killed member stalls only its own step, not the next ones until its heartbeat timeout.
  bool silent_since_reported_lost(const PeerId& p) const {
    auto it = reported_lost.find(p);
    if (it == reported_lost.end()) return false;
    auto seen = server.last_seen(p);
    return !seen || *seen <= it->second;
  }

  std::set<PeerId> expected_for(uint64_t step, const StepWait& w, const std::set<PeerId>& candidates) const {
    std::set<PeerId> out;
    for (const auto& p : candidates) {
      if (left.count(p) || w.excused.count(p) || silent_since_reported_lost(p)) continue;
      bool elsewhere = false;
      for (const auto& [other, ow] : waiting)
        if (other != step && ow.requests.count(p)) elsewhere = true;
      if (!elsewhere) out.insert(p);
    }
    return out;
  }

  void form_due(Clock::time_point now) {
    if (waiting.empty()) return;
    bool in_grace = now - started < options.startup_grace;
    std::set<PeerId> candidates;
    for (const auto& p : server.peers_seen_within(options.heartbeat_timeout))
      if (admitted(p)) candidates.insert(p);  // a connected key that was refused is nobody to wait for
    if (in_grace) {
      // A fresh job: give every member on the allow-list the grace to connect and ask, so the
      // first step does not form with whoever happened to start first.
      candidates.insert(options.allowed.peers().begin(), options.allowed.peers().end());
      candidates.erase(server.id());
    }
    std::vector<uint64_t> due;
    for (auto& [step, w] : waiting) {
      bool all_here = true;
      for (const auto& p : expected_for(step, w, candidates))
        if (!w.requests.count(p)) all_here = false;
      bool timed_out = now - w.first_at >= options.quorum_timeout;
      if (!all_here && (in_grace || !timed_out)) continue;
      size_t with_state = 0;
      for (const auto& [p, r] : w.requests) with_state += r.has_state ? 1 : 0;
      size_t contributors = with_state > 0 ? with_state : w.requests.size();
      if (contributors < options.min_peers) {
        if (!w.logged_min_peers) {
          log::info("coord", "step {}: {} of min_peers {} contributors are waiting; the quorum waits for more", step,
                    contributors, options.min_peers);
          w.logged_min_peers = true;
        }
        continue;
      }
      due.push_back(step);
    }
    for (uint64_t step : due) form(step, now);
  }

  // R10: members with state that sent a digest of their parameters must all have sent the same.
  // The largest group of equal digests is the job's state (ties: the group of the lowest peer
  // id); the others diverged. Members without a digest are not compared.
  std::vector<PeerId> divergent_members(uint64_t step, const StepWait& w) {
    std::map<crypto::Digest, std::vector<PeerId>> groups;  // peers in rank order within each group
    for (const auto& [p, r] : w.requests)
      if (r.has_state && r.state_digest) groups[*r.state_digest].push_back(p);
    if (groups.size() < 2) return {};
    auto majority = groups.begin();
    for (auto it = groups.begin(); it != groups.end(); ++it)
      if (it->second.size() > majority->second.size() ||
          (it->second.size() == majority->second.size() && it->second.front() < majority->second.front()))
        majority = it;
    std::vector<PeerId> divergent;
    std::string report;
    for (auto it = groups.begin(); it != groups.end(); ++it) {
      report += fmt::format("; digest {}: {}", crypto::to_hex(it->first).substr(0, 16), describe_peers(it->second));
      if (it != majority) divergent.insert(divergent.end(), it->second.begin(), it->second.end());
    }
    std::sort(divergent.begin(), divergent.end());
    ++counters.state_divergences;
    log::error("coord", "step {}: members hold different parameters (state diverged); taken as the job's: digest "
               "{}{}", step, crypto::to_hex(majority->first).substr(0, 16), report);
    return divergent;
  }

  void form(uint64_t step, Clock::time_point now) {
    auto node = waiting.extract(step);
    StepWait& w = node.mapped();
    Quorum q;
    q.quorum_id = next_quorum_id++;
    if (q.quorum_id == 0) q.quorum_id = next_quorum_id++;
    q.step = step;
    bool any_state = false;
    for (const auto& [p, r] : w.requests) any_state = any_state || r.has_state;
    // R10: a diverged member is resynced like a joiner: it takes the state of a member of the
    // majority (one that sent a digest, when any did) and contributes nothing to this step.
    q.divergent = divergent_members(step, w);
    auto diverged = [&](const PeerId& p) { return std::binary_search(q.divergent.begin(), q.divergent.end(), p); };
    const bool digests = !q.divergent.empty();
    std::vector<PeerId> joiners;
    uint32_t rank = 0;
    for (const auto& [p, r] : w.requests) {  // std::map: ordered by PeerId bytes (R2)
      Member m{p, r.host, r.port, rank, (!any_state || r.has_state) && !diverged(p)};
      if (m.contributes && any_state && q.state_source_rank < 0 && (!digests || r.state_digest))
        q.state_source_rank = static_cast<int32_t>(rank);
      if (!m.contributes) joiners.push_back(p);
      q.members.push_back(std::move(m));
      ++rank;
    }
    if (joiners.empty()) q.state_source_rank = -1;  // R3: nobody needs state

    Attempt& a = attempts[q.quorum_id];
    a.quorum = q;
    current[step] = q.quorum_id;
    if (!latest_step || step > *latest_step) latest_step = step;
    ++counters.quorums_formed;
    counters.last_step = step;
    counters.last_quorum_id = q.quorum_id;
    counters.last_quorum_size = q.members.size();

    log::info("coord", "quorum {:016x} for step {}: {} peers, {} contributing{}{} (waited {} ms)", q.quorum_id, step,
              q.members.size(), q.contributors(),
              joiners.empty() ? "" : fmt::format("; joiners {} get state from rank {}", describe_peers(joiners),
                                                 q.state_source_rank),
              w.excused.empty() ? "" : fmt::format("; not waited for: {}", describe_peers(std::vector<PeerId>(w.excused.begin(), w.excused.end()))),
              ms_of(now - w.first_at));
    for (const auto& m : q.members) send_to(m.id, MessageKind::Quorum, q.quorum_id, step, q);

    // Requests still waiting for older steps are behind the job now (R4).
    for (auto it = waiting.begin(); it != waiting.end() && it->first < step;) {
      for (const auto& [p, r] : it->second.requests)
        send_rejoin(p, it->first, step + 1, fmt::format("the job moved on to step {}", step));
      it = waiting.erase(it);
    }
    // Forget attempts of old steps.
    for (auto it = attempts.begin(); it != attempts.end();)
      it = it->second.quorum.step + kKeepSteps < *latest_step ? attempts.erase(it) : std::next(it);
    for (auto it = current.begin(); it != current.end();)
      it = it->first + kKeepSteps < *latest_step ? current.erase(it) : std::next(it);
  }

  // --- the loop -------------------------------------------------------------------------------

  Clock::time_point next_timer(Clock::time_point now) const {
    // Only timers still ahead: a wait already past its timeout (held by min_peers) must not
    // make the loop spin.
    Clock::time_point t = now + kMaxSlice;
    for (const auto& [step, w] : waiting)
      if (auto due = w.first_at + options.quorum_timeout; due > now) t = std::min(t, due);
    if (!waiting.empty() && now < started + options.startup_grace) t = std::min(t, started + options.startup_grace);
    return t;
  }

  void tick() {
    auto now = Clock::now();
    drop_silent(now);
    form_due(now);
    publish();
  }

  void publish() {
    counters.members = members.size();
    auto live = server.peers_seen_within(options.heartbeat_timeout);
    counters.live_peers = static_cast<size_t>(std::count_if(live.begin(), live.end(), [&](const PeerId& p) { return admitted(p); }));
    std::lock_guard lock(status_mutex);
    snapshot = counters;
  }

  void poll(Deadline deadline, const CancelToken* cancel) {
    for (;;) {
      tick();
      auto now = Clock::now();
      if (now >= deadline.at()) return;
      Deadline slice(std::min(deadline.at(), next_timer(now)));
      std::optional<net::Message> m = server.recv(slice, cancel);  // throws CancelledError
      if (!m) continue;
      try {
        handle(*m);
      } catch (const std::exception& e) {
        log::warn("coord", "message of kind {} from {} ignored: {}", m->header.type, fp(m->header.sender), e.what());
      }
      publish();
    }
  }
};

// ---------------------------------------------------------------------------------------------

Coordinator::Coordinator(const crypto::Identity& self, CoordinatorOptions options)
    : impl_(std::make_unique<Impl>(self, std::move(options))) {
  impl_->publish();
}

Coordinator::~Coordinator() = default;

std::string Coordinator::endpoint() const { return impl_->endpoint; }

void Coordinator::poll(Deadline deadline, const CancelToken* cancel) { impl_->poll(deadline, cancel); }

void Coordinator::run(const CancelToken& stop) {
  std::string last;
  while (!stop.cancelled()) {
    try {
      impl_->poll(Deadline::after(kMaxSlice), &stop);
    } catch (const CancelledError&) {
      break;
    }
    std::string text = status().to_text();
    if (text != last) {
      log::info("coord", "{}", text);
      last = std::move(text);
    }
  }
  log::info("coord", "coordinator stopped: {}", status().to_text());
}

CoordinatorStatus Coordinator::status() const {
  std::lock_guard lock(impl_->status_mutex);
  return impl_->snapshot;
}

}  // namespace meshtrain::coord
