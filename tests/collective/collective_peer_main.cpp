// collective_peer: one job member in the multi-process collective tests. Runs training-like
// steps: takes the quorum, receives state when it is a joiner, averages its gradients with
// Communicator::reduce_step, applies them to its parameters, and records every step.
//
//   collective_peer --key PEM --coordinator-endpoint E --coordinator HEX --members FILE
//                   --out FILE --seed N --count N --steps N [--start-step S] [--join]
//                   [--die-at STEP --die-phase reduce_scatter|all_gather --die-ring-step K]
//                   [--sleep-at STEP --sleep-ms MS] [--step-delay-ms MS]
//                   [--join-token TOKEN|FILE]  (a member admitted by join token)
//                   [--check-state [--perturb-at STEP]]
//
// --check-state: every request carries a digest of the parameters (Communicator::
// set_state_digest), and a quorum naming divergent members is written as "divergent S HEX,...".
// --perturb-at: this member adds 1 to its first parameter before STEP (a diverged state).
//                   [--codec SPEC [--sparse-gather auto|owner|allgather] [--corrupt-at STEP]
//                    [--shape ROWSxCOLS] [--exchange direct|ring]]
//                   [--problem random|lsq] [--max-attempts N] [--device cpu|cuda [--cuda-stream]]
//
// --codec: the compressed all-reduce (reduce_step with a codec). --corrupt-at: at that step
// this member's payload for the next rank's chunk gets 0xff in its first body bytes.
// --problem lsq: the gradient is that of the least-squares shard of member `seed`
// (collective/least_squares.h), at the current parameters.
// --device cuda: the gradient is reduced from a buffer on CUDA device 0 (copied there before
// each step and back after it); the parameters stay on the CPU. The CUDA context is made after
// the Communicator has announced this member (it can take seconds). --cuda-stream: on a new
// non-blocking stream (CommunicatorOptions::cuda_stream) instead of the legacy default stream.
//
// Output (--out): one line per step:
//   step S quorum QID attempts A members M contributors HEX,HEX,... result SHA params SHA
// and "missed S next N" for a missed step; the averaged gradient of step S is written raw to
// OUT.S.bin so the test can compare it with a float64 reference. With --codec, the member
// residual before and after step S goes to OUT.S.before.bin and OUT.S.after.bin. The final
// parameters go to OUT.params.bin; an error that ends the run goes to OUT.error.
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <thread>

#include "kernels/compress/api.h"
#include "support/flags.h"
#include "meshtrain/collective.h"
#include "collective/gradient.h"
#include "collective/least_squares.h"

using namespace meshtrain;
using namespace std::chrono_literals;

namespace {

uint64_t current_step = 0;

std::string digest(const void* p, size_t n) {
  return crypto::to_hex(crypto::sha256(crypto::ByteSpan(static_cast<const uint8_t*>(p), n)));
}

void write_floats(const std::string& path, const std::vector<float>& v) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

collective::SparseGather parse_sparse_gather(const std::string& s) {
  if (s == "auto") return collective::SparseGather::Auto;
  if (s == "owner") return collective::SparseGather::Owner;
  if (s == "allgather") return collective::SparseGather::AllGather;
  throw InvalidArgumentError("--sparse-gather " + s + " (auto, owner, allgather)");
}

int run(std::map<std::string, std::string>& a) {
  auto self = crypto::Identity::load_pem(a.at("--key"));
  collective::CommunicatorOptions o;
  o.coordinator_endpoint = a.at("--coordinator-endpoint");
  o.coordinator = crypto::PeerId::from_hex(a.at("--coordinator"));
  o.members = net::AllowList::load(a.at("--members"));
  if (a.count("--join-token")) o.join_token = coord::JoinToken::load(a.at("--join-token"));
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
  const uint32_t max_attempts = a.count("--max-attempts") ? std::stoul(a.at("--max-attempts")) : 5;
  const bool least_squares = a.count("--problem") && a.at("--problem") == "lsq";
  std::optional<test_support::LeastSquaresShard> shard;
  if (least_squares) shard.emplace(static_cast<int>(seed));
  std::unique_ptr<compress::Codec> codec;
  collective::CompressedOptions compressed;
  if (a.count("--codec")) codec = compress::make_codec(a.at("--codec"));
  if (a.count("--sparse-gather")) compressed.sparse_gather = parse_sparse_gather(a.at("--sparse-gather"));
  if (a.count("--exchange")) {
    const std::string& e = a.at("--exchange");
    if (e != "direct" && e != "ring") throw InvalidArgumentError("--exchange " + e + " (direct, ring)");
    compressed.exchange = e == "direct" ? collective::Exchange::Direct : collective::Exchange::Ring;
  }
  if (a.count("--shape")) {
    const std::string& shape = a.at("--shape");
    compressed.shape = {std::stoull(shape.substr(0, shape.find('x'))), std::stoull(shape.substr(shape.find('x') + 1))};
  }
  const uint64_t corrupt_at = a.count("--corrupt-at") ? std::stoull(a.at("--corrupt-at")) : 0;
  const std::string device = a.count("--device") ? a.at("--device") : "cpu";
  if (device != "cpu" && device != "cuda") throw InvalidArgumentError("--device " + device + " (cpu, cuda)");
  const bool own_stream = a.count("--cuda-stream");
  if (own_stream && device != "cuda") throw InvalidArgumentError("--cuda-stream needs --device cuda");
  // Declared before the communicator, so destroyed after it (it uses the stream to the end).
  const std::unique_ptr<void, void (*)(void*)> own_cuda_stream(
      own_stream ? cuda::compress::stream_create(0) : nullptr, [](void* s) { cuda::compress::stream_destroy(s, 0); });
  o.cuda_stream.handle = own_cuda_stream.get();
  void* const stream = o.cuda_stream.handle;
  collective::Communicator comm(self, o);
  std::optional<cuda::compress::DeviceBuffer> device_gradient;
  if (device == "cuda") device_gradient.emplace(count * sizeof(float), 0);
  if (corrupt_at)
    compressed.payload_hook = [&](uint32_t owner, std::span<uint8_t> payload) {
      const size_t n = comm.quorum().members.size();
      if (current_step != corrupt_at || owner != (comm.rank() + 1) % n) return;
      for (size_t i = compress::kPayloadHeaderBytes; i < std::min(payload.size(), compress::kPayloadHeaderBytes + 4); ++i)
        payload[i] = 0xff;
    };
  collective::CompressedState compressed_state(compressed);
  std::vector<float> params(count, 0.0f);
  bool has_state = !a.count("--join");
  const bool check_state = a.count("--check-state");
  const uint64_t perturb_at = a.count("--perturb-at") ? std::stoull(a.at("--perturb-at")) : 0;
  while (step < end) {
    current_step = step;
    if (step == sleep_at) std::this_thread::sleep_for(std::chrono::milliseconds(std::stoi(a.at("--sleep-ms"))));
    if (delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    if (step == perturb_at) params[0] += 1.0f;
    if (check_state && has_state) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(params.data());
      comm.set_state_digest(step, crypto::sha256({bytes, params.size() * sizeof(float)}));
    }
    const coord::Quorum* q;
    try {
      q = &comm.next_quorum(step, has_state);
    } catch (const collective::StepMissedError& e) {
      out << "missed " << e.missed_step << " next " << e.next_step << std::endl;
      step = e.next_step;
      has_state = false;
      continue;
    }
    if (!q->divergent.empty()) {
      std::string keys;
      for (const auto& p : q->divergent) keys += (keys.empty() ? "" : ",") + p.hex();
      out << "divergent " << step << " " << keys << std::endl;
    }
    if (q->state_source_rank >= 0) {
      comm.broadcast(BufferView{params.data(), params.size(), DType::Float32}, q->state_source_rank);
      has_state = true;
    }
    std::vector<float> g = least_squares ? shard->gradient_at(params) : test_support::gradient(seed, step, count);
    const std::string prefix = a.at("--out") + "." + std::to_string(step);
    BufferView view{g.data(), g.size(), DType::Float32};
    if (device_gradient) {
      cuda::compress::copy_async(device_gradient->data(), g.data(), count * sizeof(float), 0, stream);
      cuda::compress::synchronize(0, stream);
      view = BufferView{device_gradient->data(), count, DType::Float32, DeviceKind::Cuda, 0};
    }
    collective::StepResult r;
    if (codec) {
      write_floats(prefix + ".before.bin", compressed_state.member_residual());
      r = comm.reduce_step(step, view, *codec, compressed_state, max_attempts);
      write_floats(prefix + ".after.bin", compressed_state.member_residual());
    } else {
      r = comm.reduce_step(step, view, max_attempts);
    }
    if (device_gradient) {
      cuda::compress::copy_async(g.data(), device_gradient->data(), count * sizeof(float), 0, stream);
      cuda::compress::synchronize(0, stream);
    }
    for (size_t i = 0; i < count; ++i) params[i] -= 0.5f * g[i];
    std::string contributors;
    for (const auto& c : r.contributors) contributors += (contributors.empty() ? "" : ",") + c.hex();
    write_floats(prefix + ".bin", g);
    out << "step " << step << " quorum " << r.quorum.quorum_id << " attempts " << r.attempts << " members "
        << r.quorum.members.size() << " contributors " << (contributors.empty() ? "-" : contributors) << " result "
        << digest(g.data(), g.size() * 4) << " params " << digest(params.data(), params.size() * 4) << std::endl;
    ++step;
  }
  write_floats(a.at("--out") + ".params.bin", params);
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
    if (args.count("--out")) std::ofstream(args.at("--out") + ".error") << e.what() << std::endl;
    return 4;
  } catch (const std::exception& e) {  // e.g. a CUDA failure of the test's own copies
    std::fprintf(stderr, "collective_peer: %s\n", e.what());
    if (args.count("--out")) std::ofstream(args.at("--out") + ".error") << e.what() << std::endl;
    return 4;
  }
}
