// meshtrain-bench: the throughput suite's binary.
//
//   meshtrain-bench allreduce --peers N --size BYTES [--repeats R] [--warmup W] [--streams S]
//       [--chunk-bytes B] [--plain|--encrypted] [--baseline gloo]
//       [--wan hosts=K,rate=200mbit,delay=50ms] [--fault kill-during=reduce_scatter|all_gather]
//       [--reduce-step] [--codec SPEC [--sparse-gather auto|owner|allgather] [--shape RxC]
//        [--exchange direct|ring]] [--device cpu|cuda [--pageable-staging]]
//
// Measures Communicator::allreduce (fp32, Sum) between N real processes on this machine, as
// nccl-tests report it: per iteration the slowest member's time, the median over repeats,
// algbw = bytes / time and busbw = algbw * 2(n-1)/n. One JSON line per configuration on stdout;
// progress and logs on stderr. See usage() and docs/benchmarks.md ("All-reduce").
#include <cstdio>
#include <string>
#include <vector>

#include "driver.h"
#include "meshtrain/core.h"
#include "options.h"
#include "worker.h"

namespace {

const char* const kUsage = R"(usage: meshtrain-bench allreduce --peers N --size BYTES [options]

Times meshtrain's ring all-reduce (fp32, Sum) between N worker processes (this binary,
re-executed) and a coordinator, and prints one JSON line per measured configuration:
  impl, op, peers, bytes, dtype, security, streams, chunk_bytes, repeats, warmup, seconds (median
  over repeats of the slowest worker's time), algbw_GBps (bytes/seconds/1e9), busbw_GBps
  (algbw * 2(n-1)/n, as nccl-tests), host, cores, verified, iteration_seconds, ...

options:
  --peers N                 worker processes (2..254)
  --size BYTES              buffer size: a multiple of 4; units KiB, MiB, GiB (e.g. 64MiB)
  --repeats R               timed iterations (default 10)
  --warmup W                untimed iterations first (default 2)
  --streams S               TCP streams per ring neighbour (default 1)
  --chunk-bytes B           ring pipelining unit (default 1MiB)
  --plain | --encrypted     bulk security to measure (default: both, one line each)
  --baseline gloo           also time torch.distributed's gloo all_reduce (same sizes, same
                            timing rule; needs /usr/bin/python3 with torch) and add
                            ratio_vs_baseline (busbw ratio) to meshtrain's lines
  --wan hosts=K,rate=R,delay=D
                            run worker i in network namespace i % K (benchmarks/wan/netns.sh,
                            upload shaped to R, e.g. 200mbit) and, with D > 0, put a delaying
                            relay (D one-way, e.g. 50ms) in front of every worker's listener.
                            Needs root; exit 77 where namespaces are unavailable. Adds
                            link_rate_Mbps and busbw_vs_link.
  --fault kill-during=PHASE[,iteration=K][,victim=I][,ring-step=S]
                            PHASE reduce_scatter or all_gather: worker I (default the last)
                            is SIGKILLed at ring step S (default 1) of that phase in iteration
                            K (default warmup + repeats/2); workers run reduce_step. Adds
                            recovery_seconds (victim's death to the survivors' completed retry),
                            heartbeat_timeout_ms, reduction_seconds (one reduction after the
                            fault) and within_bound (recovery <= heartbeat timeout + reduction);
                            resume_seconds: death to the survivors' next step done
  --reduce-step             time Communicator::reduce_step (quorum request, all-reduce with Avg,
                            commit: a training step's collective) instead of raw allreduce
  --codec SPEC              the compressed all-reduce (Communicator::allreduce_compressed) with
                            a codec of compress::make_codec: none, fp16, bf16, int8[:block_size=B,
                            rounding=nearest|stochastic], topk[:fraction=F], powersgd[:rank=R]
                            (with --shape; flat, it is sent uncompressed).
                            Every line gets codec, effective_Mbps (uncompressed bytes x 8 /
                            seconds), wire_sent_bytes (payload bytes one member sends per
                            all-reduce; the plain ring's 2(n-1)/n x bytes without --codec) and
                            wire_vs_plain
  --sparse-gather MODE      top-k: auto (default), owner or allgather (see collective.h)
  --exchange MODE           how encoded chunks reach their owners: direct (default; each member
                            sends to each owner) or ring (relayed along the ring)
  --shape ROWSxCOLS         PowerSGD's matrix view of the buffer (rows x cols x 4 = --size)
  --device cpu|cuda         where each worker's buffer lives (default cpu). cuda: CUDA device 0
                            of this host for every worker; filled and checked on the host,
                            copied outside the timed region. With --codec the codecs' kernels
                            encode and decode there; plain all-reduces stage through the host
  --pageable-staging        with --device cuda: host copies in pageable memory instead of pinned
                            (CommunicatorOptions::pinned_staging = false), the baseline for the
                            pinned staging's gain
  --heartbeat-timeout-ms MS the coordinator's (default 2000 with --fault, else 5000)
  --timeout-s T             give up on a job after T seconds (default 600)
  --python PATH             interpreter for the baseline (default /usr/bin/python3)
  --gloo-script PATH        gloo_allreduce.py (default: installed copy, else the source tree)
  --netns-script PATH       netns.sh (default: installed copy, else the source tree)
  --verbose                 workers and coordinator log at info (default warn; MESHTRAIN_LOG wins)

Exit codes: 0 done (a skipped baseline is only a warning), 1 a run failed or a result was
wrong, 2 usage error, 77 --wan without network namespaces or --device cuda without a device.
)";

std::vector<std::string> rest(int argc, char** argv, int from) { return {argv + from, argv + argc}; }

}  // namespace

int main(int argc, char** argv) {
  using namespace meshtrain;
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
      std::string(argv[1]) == "help") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string sub = argv[1];
  try {
    if (sub == "allreduce") {
      for (int i = 2; i < argc; ++i)
        if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
          std::fputs(kUsage, stdout);
          return 0;
        }
      return bench::run_allreduce(bench::parse_allreduce_args(rest(argc, argv, 2)));
    }
    if (sub == "allreduce-worker") return bench::run_worker_subcommand(rest(argc, argv, 2));
    if (sub == "allreduce-coordinator") return bench::run_coordinator_subcommand(rest(argc, argv, 2));
    if (sub == "tcp-ring-worker") return bench::run_tcp_ring_subcommand(rest(argc, argv, 2));
    std::fprintf(stderr, "meshtrain-bench: unknown subcommand '%s' (allreduce; --help for usage)\n", sub.c_str());
    return 2;
  } catch (const bench::UsageError& e) {
    std::fprintf(stderr, "meshtrain-bench %s: %s (--help for usage)\n", sub.c_str(), e.what());
    return 2;
  } catch (const Error& e) {
    std::fprintf(stderr, "meshtrain-bench %s: %s error: %s\n", sub.c_str(), error_code_name(e.code()).data(),
                 e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meshtrain-bench %s: %s\n", sub.c_str(), e.what());
    return 1;
  }
}
