// `meshtrain-bench allreduce`: the parent side. Generates the job's keys, starts a coordinator
// and N worker processes (itself, re-executed), optionally inside emulated WAN hosts, collects
// their timings and prints one JSON line per measured configuration on stdout.
#pragma once

#include "options.h"

namespace meshtrain::bench {

// Exit codes: 0 measured (a skipped baseline is a warning), 1 a run failed, 77 --wan where
// network namespaces are unavailable.
int run_allreduce(const AllreduceOptions& options);

// The median of `values` (mean of the middle two for an even count); NaN when empty.
double median(std::vector<double> values);
// nccl-tests' bus bandwidth factor for all-reduce: 2(n-1)/n.
inline double allreduce_bus_factor(int peers) { return 2.0 * (peers - 1) / peers; }

}  // namespace meshtrain::bench
