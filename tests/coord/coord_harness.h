// Test members for the coordinator: each owns a ControlClient driven by its own thread (so it
// heartbeats like a real member while the test waits), with an inbox of what the coordinator
// sent and an outbox the test fills.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "meshtrain/coord.h"

namespace meshtrain::coord::testing {

using namespace std::chrono_literals;

inline net::ControlOptions member_control() {
  net::ControlOptions o;
  o.heartbeat_interval = 100ms;
  o.linger = 0ms;
  return o;
}


class TestMember {
 public:
  TestMember(crypto::Identity identity, const PeerId& server, const std::string& endpoint, uint16_t bulk_port)
      : id_(std::move(identity)), client_(id_, server, endpoint, member_control()), bulk_port_(bulk_port) {
    client_.heartbeat();
    thread_ = std::thread([this] { loop(); });
  }
  ~TestMember() {
    stop_.cancel();
    thread_.join();
  }
  TestMember(const TestMember&) = delete;
  TestMember& operator=(const TestMember&) = delete;

  const PeerId& id() const { return id_.public_key(); }
  uint16_t bulk_port() const { return bulk_port_; }

  void send(MessageKind kind, std::vector<uint8_t> payload = {}, uint64_t quorum_id = 0, uint64_t step = 0) {
    net::MessageHeader h;
    h.type = static_cast<uint16_t>(kind);
    h.quorum_id = quorum_id;
    h.step = step;
    std::lock_guard lock(mutex_);
    outbox_.push_back({h, std::move(payload)});
  }
  void send_type(uint16_t type, std::vector<uint8_t> payload) {
    net::MessageHeader h;
    h.type = type;
    std::lock_guard lock(mutex_);
    outbox_.push_back({h, std::move(payload)});
  }

  void request(uint64_t step, bool has_state = true, uint64_t failed_quorum_id = 0, std::vector<PeerId> lost = {}) {
    QuorumRequest r;
    r.step = step;
    r.host = "127.0.0.1";
    r.port = bulk_port_;
    r.has_state = has_state;
    r.failed_quorum_id = failed_quorum_id;
    r.lost = std::move(lost);
    send(MessageKind::QuorumRequest, encode(r), 0, step);
  }

  std::optional<net::Message> next(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    if (!cv_.wait_for(lock, timeout, [&] { return !inbox_.empty(); })) return std::nullopt;
    net::Message m = std::move(inbox_.front());
    inbox_.pop_front();
    return m;
  }

  // The next message must be of `kind` and arrive within `timeout`.
  std::optional<net::Message> expect(MessageKind kind, std::chrono::milliseconds timeout = 5s) {
    auto m = next(timeout);
    if (!m) {
      ADD_FAILURE() << "member " << id().fingerprint() << ": no " << message_kind_name(static_cast<uint16_t>(kind))
                    << " within " << timeout.count() << " ms";
      return std::nullopt;
    }
    if (m->header.type != static_cast<uint16_t>(kind)) {
      ADD_FAILURE() << "member " << id().fingerprint() << ": expected " << message_kind_name(static_cast<uint16_t>(kind))
                    << ", got " << message_kind_name(m->header.type);
      return std::nullopt;
    }
    return m;
  }
  Quorum expect_quorum(std::chrono::milliseconds timeout = 5s) {
    auto m = expect(MessageKind::Quorum, timeout);
    return m ? decode_quorum(m->payload, "coordinator") : Quorum{};
  }
  Rejoin expect_rejoin(std::chrono::milliseconds timeout = 5s) {
    auto m = expect(MessageKind::Rejoin, timeout);
    return m ? decode_rejoin(m->payload, "coordinator") : Rejoin{};
  }
  Abort expect_abort(std::chrono::milliseconds timeout = 5s) {
    auto m = expect(MessageKind::Abort, timeout);
    return m ? decode_abort(m->payload, "coordinator") : Abort{};
  }
  // Nothing arrives for `quiet`.
  void expect_nothing(std::chrono::milliseconds quiet) {
    if (auto m = next(quiet))
      ADD_FAILURE() << "member " << id().fingerprint() << ": unexpected " << message_kind_name(m->header.type);
  }

 private:
  void loop() {
    while (!stop_.cancelled()) {
      std::deque<std::pair<net::MessageHeader, std::vector<uint8_t>>> out;
      {
        std::lock_guard lock(mutex_);
        out.swap(outbox_);
      }
      for (auto& [h, p] : out) {
        try {
          client_.send(h, p);
        } catch (const Error& e) {
          ADD_FAILURE() << "member send failed: " << e.what();
        }
      }
      try {
        net::Message m = client_.recv(Deadline::after(10ms), &stop_);
        std::lock_guard lock(mutex_);
        inbox_.push_back(std::move(m));
        cv_.notify_all();
      } catch (const TimeoutError&) {
      } catch (const CancelledError&) {
        return;
      }
    }
  }

  crypto::Identity id_;
  net::ControlClient client_;
  uint16_t bulk_port_;
  CancelToken stop_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<net::MessageHeader, std::vector<uint8_t>>> outbox_;
  std::deque<net::Message> inbox_;
  std::thread thread_;
};

// A Coordinator serving on its own thread through run().
class RunningCoordinator {
 public:
  RunningCoordinator(const crypto::Identity& self, CoordinatorOptions options)
      : coordinator_(std::make_unique<Coordinator>(self, std::move(options))) {
    thread_ = std::thread([this] { coordinator_->run(stop_); });
  }
  ~RunningCoordinator() {
    stop_.cancel();
    thread_.join();
  }
  Coordinator& operator*() { return *coordinator_; }
  Coordinator* operator->() { return coordinator_.get(); }

 private:
  std::unique_ptr<Coordinator> coordinator_;
  CancelToken stop_;
  std::thread thread_;
};

// Waits until `pred` holds (checked every 10 ms) or `timeout` passes.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = 5s) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

}  // namespace meshtrain::coord::testing
