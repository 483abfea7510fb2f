// The hidden subcommands meshtrain-bench re-executes itself with (/proc/self/exe):
//
//   allreduce-coordinator  a meshtrain::coord::Coordinator serving one benchmark job
//   allreduce-worker       one job member: a Communicator running the timed all-reduces
//   tcp-ring-worker        --wan's link baseline: plain TCP to the next host while receiving
//                          from the previous one, as many bytes as a ring all-reduce sends
//
// Their flags are written by the driver (driver.cpp), not by people; see the comments at the
// top of worker.cpp.
#pragma once

#include <string>
#include <vector>

namespace meshtrain::bench {

int run_coordinator_subcommand(const std::vector<std::string>& args);
int run_worker_subcommand(const std::vector<std::string>& args);
int run_tcp_ring_subcommand(const std::vector<std::string>& args);

}  // namespace meshtrain::bench
