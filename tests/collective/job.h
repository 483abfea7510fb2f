// A job on loopback for the collective tests: a real meshtrain-coordinator process and
// collective_peer processes, with their keys, allow-list and output files in a temp dir.
// Peers [0, peers) are on the allow-list; peers [peers, peers + outsiders) are not (they join
// with a token of the job owner, owner.pem, when job_owner is set).
#pragma once

#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "meshtrain/crypto.h"
#include "support/child_process.h"
#include "support/temp_dir.h"

namespace meshtrain::test_support {

struct StepRecord {
  uint64_t step = 0;
  uint64_t quorum_id = 0;
  uint32_t attempts = 0;
  size_t members = 0;
  std::vector<std::string> contributors;  // hex keys
  std::string result;                     // sha256 of the averaged gradient
  std::string params;                     // sha256 of the parameters after the step
};

struct PeerLog {
  std::map<uint64_t, StepRecord> steps;
  std::map<uint64_t, uint64_t> missed;  // missed step -> next step
  std::map<uint64_t, std::vector<std::string>> divergent;  // step -> hex keys the quorum named divergent
};

class Job {
 public:
  struct Options {
    int peers = 3;
    int min_peers = 1;
    int quorum_timeout_ms = 3000;
    int heartbeat_timeout_ms = 2000;
    int startup_grace_ms = 2000;  // lets every member announce itself before step 1 forms
    int outsiders = 0;
    bool job_owner = false;       // the coordinator admits join tokens signed by owner.pem
    bool capture_output = false;  // peers' stdout and stderr go to log_path(i), not the test's
  };

  explicit Job(Options o) : options_(o) {
    crypto::Identity coordinator = crypto::Identity::generate();
    coordinator.save_pem(dir_ / "coordinator.pem");
    coordinator_key_ = coordinator.public_key().hex();
    std::ofstream members(dir_ / "members.txt");
    for (int i = 0; i < o.peers; ++i) {
      crypto::Identity id = crypto::Identity::generate();
      id.save_pem(dir_ / pem_name(i));
      keys_.push_back(id.public_key().hex());
      members << keys_.back() << "\n";
    }
    for (int i = o.peers; i < o.peers + o.outsiders; ++i) {
      crypto::Identity id = crypto::Identity::generate();
      id.save_pem(dir_ / pem_name(i));
      keys_.push_back(id.public_key().hex());
    }
    if (o.job_owner) {
      crypto::Identity owner = crypto::Identity::generate();
      owner.save_pem(dir_ / "owner.pem");
      owner_key_ = owner.public_key().hex();
    }
  }

  // Starts (or restarts) the coordinator; port 0 the first time, the same port afterwards.
  void start_coordinator() {
    std::string endpoint_file = (dir_ / "endpoint.txt").string();
    std::filesystem::remove(endpoint_file);
    std::string bind = port_.empty() ? "tcp://127.0.0.1:0" : "tcp://127.0.0.1:" + port_;
    std::vector<std::string> args = {
        COORDINATOR_BINARY, "--bind", bind, "--key", (dir_ / "coordinator.pem").string(), "--allow",
        (dir_ / "members.txt").string(), "--min-peers", std::to_string(options_.min_peers), "--quorum-timeout-ms",
        std::to_string(options_.quorum_timeout_ms), "--heartbeat-timeout-ms",
        std::to_string(options_.heartbeat_timeout_ms), "--startup-grace-ms", std::to_string(options_.startup_grace_ms),
        "--print-endpoint-file", endpoint_file};
    if (!owner_key_.empty()) args.insert(args.end(), {"--job-owner", owner_key_});
    coordinator_ = std::make_unique<ChildProcess>(args);
    for (int i = 0; i < 500 && endpoint_.empty(); ++i) {
      std::ifstream in(endpoint_file);
      std::string endpoint, key;
      if (in >> endpoint >> key && !key.empty()) {
        endpoint_ = endpoint;
        port_ = endpoint.substr(endpoint.rfind(':') + 1);
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    if (endpoint_.empty()) throw std::runtime_error("the coordinator did not write its endpoint");
  }
  void kill_coordinator() {
    coordinator_.reset();  // SIGKILL + reap
    endpoint_.clear();
  }

  // Starts peer i with extra flags; returns its process.
  ChildProcess& start_peer(int i, uint64_t steps, size_t count, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {PEER_BINARY, "--key", (dir_ / pem_name(i)).string(), "--coordinator-endpoint",
                                     endpoint_, "--coordinator", coordinator_key_, "--members",
                                     (dir_ / "members.txt").string(), "--out", out_path(i), "--seed",
                                     std::to_string(seed(i)), "--count", std::to_string(count), "--steps",
                                     std::to_string(steps)};
    args.insert(args.end(), extra.begin(), extra.end());
    peers_[i] = std::make_unique<ChildProcess>(args, options_.capture_output ? log_path(i) : std::string());
    return *peers_[i];
  }
  ChildProcess& peer(int i) { return *peers_.at(i); }

  PeerLog log(int i) const {
    PeerLog log;
    std::ifstream in(out_path(i));
    std::string word;
    while (in >> word) {
      if (word == "divergent") {
        uint64_t step;
        std::string keys;
        in >> step >> keys;
        std::stringstream split(keys);
        for (std::string k; std::getline(split, k, ',');) log.divergent[step].push_back(k);
        continue;
      }
      if (word == "missed") {
        uint64_t missed, next;
        std::string next_word;
        in >> missed >> next_word >> next;
        log.missed[missed] = next;
        continue;
      }
      StepRecord r;
      std::string w, contributors;
      in >> r.step >> w >> r.quorum_id >> w >> r.attempts >> w >> r.members >> w >> contributors >> w >> r.result >>
          w >> r.params;
      std::stringstream split(contributors);
      for (std::string c; std::getline(split, c, ',');)
        if (c != "-") r.contributors.push_back(c);
      log.steps[r.step] = r;
    }
    return log;
  }

  std::vector<float> result(int i, uint64_t step) const {
    std::ifstream in(out_path(i) + "." + std::to_string(step) + ".bin", std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<float> out(bytes.size() / sizeof(float));
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
    return out;
  }

  // Peer i's file `suffix` next to its output ("" is the output itself, ".2.after.bin", ...).
  std::string output_path(int i, const std::string& suffix = "") const { return out_path(i) + suffix; }

  // Peer i's stdout and stderr with capture_output.
  std::string log_path(int i) const { return out_path(i) + ".log"; }
  std::filesystem::path dir() const { return dir_.path(); }
  const std::string& coordinator_key() const { return coordinator_key_; }
  const std::string& owner_key() const { return owner_key_; }

  static uint64_t seed(int i) { return 1000 + static_cast<uint64_t>(i); }
  const std::string& key(int i) const { return keys_.at(i); }
  int index_of(const std::string& key) const {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i] == key) return static_cast<int>(i);
    return -1;
  }

 private:
  static std::string pem_name(int i) { return "peer" + std::to_string(i) + ".pem"; }
  std::string out_path(int i) const { return (dir_ / ("peer" + std::to_string(i) + ".out")).string(); }

  Options options_;
  TempDir dir_;
  std::string coordinator_key_;
  std::string owner_key_;
  std::vector<std::string> keys_;
  std::unique_ptr<ChildProcess> coordinator_;
  std::string endpoint_;
  std::string port_;
  std::map<int, std::unique_ptr<ChildProcess>> peers_;
};

}  // namespace meshtrain::test_support
