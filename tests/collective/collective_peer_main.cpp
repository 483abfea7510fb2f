// collective_peer: one job member in the multi-process collective tests. Runs training-like
// steps: takes the quorum, receives state when it is a joiner, averages its gradients with
// Communicator::reduce_step, applies them to its parameters, and records every step.
//
//   collective_peer --key PEM --coordinator-endpoint E --coordinator HEX --members FILE
//                   --out FILE --seed N --count N --steps N [--start-step S] [--join]
//                   [--die-at STEP --die-phase reduce_scatter|all_gather --die-ring-step K]
//                   [--sleep-at STEP --sleep-ms MS] [--step-delay-ms MS]
//
// Output (--out): one line per step:
//   step S quorum QID attempts A members M contributors HEX,HEX,... result SHA params SHA
// and "missed S next N" for a missed step; the averaged gradient of step S is written raw to
// OUT.S.bin so the test can compare it with a float64 reference.
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <thread>

#include "support/flags.h"
#include "meshtrain/collective.h"
#include "collective/gradient.h"

using namespace meshtrain;
using namespace std::chrono_literals;

namespace {

uint64_t current_step = 0;

std::string digest(const void* p, size_t n) {
  return crypto::to_hex(crypto::sha256(crypto::ByteSpan(static_cast<const uint8_t*>(p), n)));
}

int run(std::map<std::string, std::string>& a) {
  auto self = crypto::Identity::load_pem(a.at("--key"));
  collective::CommunicatorOptions o;
  o.coordinator_endpoint = a.at("--coordinator-endpoint");
  o.coordinator = crypto::PeerId::from_hex(a.at("--coordinator"));
  o.members = net::AllowList::load(a.at("--members"));
  o.chunk_bytes = 64 << 10;  // several pieces per chunk even for small buffers
  o.quorum_timeout = 20s;
  o.op_timeout = 30s;
  o.bulk.peer_timeout = 5s;
  const uint64_t seed = std::stoull(a.at("--seed"));
  const size_t count = std::stoull(a.at("--count"));
  const uint64_t steps = std::stoull(a.at("--steps"));
  uint64_t step = a.count("--start-step") ? std::stoull(a.at("--start-step")) : 1;
  const uint64_t end = step + steps;
  const bool die = a.count("--die-at");
  const uint64_t die_at = die ? std::stoull(a.at("--die-at")) : 0;
  const std::string die_phase = die ? a.at("--die-phase") : "";
  const size_t die_ring_step = die ? std::stoull(a.at("--die-ring-step")) : 0;
  if (die)
    o.fault_hook = [&](std::string_view phase, size_t ring_step) {
      if (current_step == die_at && phase == die_phase && ring_step == die_ring_step) ::raise(SIGKILL);
    };
  const uint64_t sleep_at = a.count("--sleep-at") ? std::stoull(a.at("--sleep-at")) : 0;
  const int delay_ms = a.count("--step-delay-ms") ? std::stoi(a.at("--step-delay-ms")) : 0;
  std::ofstream out(a.at("--out"), std::ios::app);

  collective::Communicator comm(self, o);
  std::vector<float> params(count, 0.0f);
  bool has_state = !a.count("--join");
  while (step < end) {
    current_step = step;
    if (step == sleep_at) std::this_thread::sleep_for(std::chrono::milliseconds(std::stoi(a.at("--sleep-ms"))));
    if (delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    const coord::Quorum* q;
    try {
      q = &comm.next_quorum(step, has_state);
    } catch (const collective::StepMissedError& e) {
      out << "missed " << e.missed_step << " next " << e.next_step << std::endl;
      step = e.next_step;
      has_state = false;
      continue;
    }
    if (q->state_source_rank >= 0) {
      comm.broadcast(BufferView{params.data(), params.size(), DType::Float32}, q->state_source_rank);
      has_state = true;
    }
    std::vector<float> g = test_support::gradient(seed, step, count);
    collective::StepResult r = comm.reduce_step(step, BufferView{g.data(), g.size(), DType::Float32});
    for (size_t i = 0; i < count; ++i) params[i] -= 0.5f * g[i];
    std::string contributors;
    for (const auto& c : r.contributors) contributors += (contributors.empty() ? "" : ",") + c.hex();
    std::ofstream(a.at("--out") + "." + std::to_string(step) + ".bin", std::ios::binary)
        .write(reinterpret_cast<const char*>(g.data()), g.size() * sizeof(float));
    out << "step " << step << " quorum " << r.quorum.quorum_id << " attempts " << r.attempts << " members "
        << r.quorum.members.size() << " contributors " << (contributors.empty() ? "-" : contributors) << " result "
        << digest(g.data(), g.size() * 4) << " params " << digest(params.data(), params.size() * 4) << std::endl;
    ++step;
  }
  comm.leave();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args = test_support::parse_flags(argc, argv, 1);
  try {
    return run(args);
  } catch (const std::out_of_range&) {
    std::fprintf(stderr, "collective_peer: missing a required flag (see the comment at the top)\n");
    return 2;
  } catch (const Error& e) {
    std::fprintf(stderr, "collective_peer: %s error: %s\n", error_code_name(e.code()).data(), e.what());
    return 4;
  }
}
