// A job in one process: an in-process Coordinator and one Communicator per member (each with
// its own identity, sockets and ZeroMQ context), whose operations run on a thread per member.
#pragma once

#include <functional>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "meshtrain/collective.h"

namespace meshtrain::test_support {

using namespace std::chrono_literals;

class InProcessJob {
 public:
  // min_peers: contributors a quorum needs (default: all of them). `customize` may change each
  // member's options (a fault hook, say) before its Communicator is made.
  explicit InProcessJob(int peers, int min_peers = 0,
                        const std::function<void(int member, collective::CommunicatorOptions&)>& customize = {}) {
    for (int i = 0; i < peers; ++i) ids_.push_back(crypto::Identity::generate());
    net::AllowList members;
    for (auto& id : ids_) members.add(id.public_key());
    coord::CoordinatorOptions co;
    co.bind_endpoint = "tcp://127.0.0.1:0";
    co.allowed = members;
    co.min_peers = static_cast<uint32_t>(min_peers > 0 ? min_peers : peers);
    // With fewer min_peers than members, a grace lets every member announce itself before
    // the first quorum forms (else it could form with the first one to ask).
    co.startup_grace = min_peers > 0 && min_peers < peers ? 2000ms : 0ms;
    coordinator_ = std::make_unique<coord::Coordinator>(coordinator_id_, co);
    thread_ = std::thread([this] { coordinator_->run(stop_); });
    for (auto& id : ids_) {
      collective::CommunicatorOptions o;
      o.coordinator_endpoint = coordinator_->endpoint();
      o.coordinator = coordinator_id_.public_key();
      o.members = members;
      o.chunk_bytes = 8192;
      if (customize) customize(static_cast<int>(comms_.size()), o);
      comms_.push_back(std::make_unique<collective::Communicator>(id, o));
    }
  }
  ~InProcessJob() {
    comms_.clear();
    stop_.cancel();
    thread_.join();
  }
  int size() const { return static_cast<int>(comms_.size()); }
  collective::Communicator& comm(int i) { return *comms_[i]; }

  // Runs fn(i) on one thread per member, after each has taken the quorum of `step`.
  template <typename Fn>
  void each(uint64_t step, Fn fn) {
    std::vector<std::future<void>> done;
    for (int i = 0; i < size(); ++i)
      done.push_back(std::async(std::launch::async, [&, i] {
        comms_[i]->next_quorum(step);
        fn(i);
      }));
    for (auto& f : done) f.get();
  }

 private:
  crypto::Identity coordinator_id_ = crypto::Identity::generate();
  std::vector<crypto::Identity> ids_;
  std::unique_ptr<coord::Coordinator> coordinator_;
  CancelToken stop_;
  std::thread thread_;
  std::vector<std::unique_ptr<collective::Communicator>> comms_;
};


}  // namespace meshtrain::test_support
