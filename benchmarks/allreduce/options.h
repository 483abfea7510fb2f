// Command line of `meshtrain-bench allreduce` (see bench_main.cpp for the usage text).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace meshtrain::bench {

// A bad command line: printed with a pointer to --help, exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// --wan hosts=K,rate=R,delay=D: K network namespaces whose uploads are shaped to R with tbf
// (benchmarks/wan/netns.sh), and with D > 0 a delaying relay in front of every worker's bulk
// listener, so every ring hop carries D of one-way latency.
struct WanSpec {
  int hosts = 0;
  double rate_mbit = 0;                 // link rate in Mbit/s (10^6 bit/s), per host upload
  std::chrono::microseconds delay{0};   // one-way, per ring hop
  std::string text;                     // as given, for the JSON line
};

// --fault kill-during=PHASE[,iteration=K][,victim=I][,ring-step=S]: worker I is SIGKILLed at
// ring step S of PHASE during iteration K (0-based, warmup included).
struct FaultSpec {
  std::string phase;                    // "reduce_scatter" or "all_gather"
  std::optional<int> iteration;         // default: warmup + repeats / 2
  std::optional<int> victim;            // worker index; default: the last worker
  size_t ring_step = 1;                 // 0 .. peers-2
  std::string text;
};

struct AllreduceOptions {
  int peers = 0;
  uint64_t bytes = 0;
  int repeats = 10;
  int warmup = 2;
  uint32_t streams = 1;                 // CommunicatorOptions default
  uint64_t chunk_bytes = 1u << 20;      // CommunicatorOptions default
  bool plain = true;
  bool encrypted = true;
  std::optional<std::string> baseline;  // "gloo"
  std::optional<WanSpec> wan;
  std::optional<FaultSpec> fault;
  bool reduce_step = false;             // time Communicator::reduce_step (implied by --fault)
  std::optional<std::string> codec;     // --codec SPEC: the compressed all-reduce (compress::make_codec)
  std::string sparse_gather = "auto";   // top-k: auto, owner, allgather
  std::string exchange = "direct";      // --exchange: how encoded chunks reach their owners (direct, ring)
  std::optional<std::string> shape;     // --shape ROWSxCOLS: PowerSGD's matrix view of the buffer
  std::string device = "cpu";           // --device cuda: each worker's buffer is on CUDA device 0
  bool pageable_staging = false;        // --pageable-staging: host copies of CUDA buffers not pinned
  int timeout_s = 600;                  // each job (coordinator + workers), and the baseline
  std::optional<int> heartbeat_timeout_ms;  // coordinator's; default 2000 with --fault, else 5000
  std::string python = "/usr/bin/python3";
  std::optional<std::string> gloo_script;
  std::optional<std::string> netns_script;
  bool keep_logs = false;               // --verbose: workers log at info instead of warn

  int effective_heartbeat_timeout_ms() const { return heartbeat_timeout_ms.value_or(fault ? 2000 : 5000); }
  int fault_iteration() const { return fault && fault->iteration ? *fault->iteration : warmup + repeats / 2; }
  int fault_victim() const { return fault && fault->victim ? *fault->victim : peers - 1; }
};

// Throws UsageError naming the flag at fault.
AllreduceOptions parse_allreduce_args(const std::vector<std::string>& args);

// "64MiB", "16M", "1GiB", "4096", "1k" (binary multiples) -> bytes.
uint64_t parse_bytes(const std::string& flag, const std::string& text);
WanSpec parse_wan(const std::string& text);
FaultSpec parse_fault(const std::string& text);

}  // namespace meshtrain::bench
