// The checkpoint benchmark: save and load throughput beside a sequential fsynced write and a
// sequential read of the same size measured in the same run, and the time a training loop is
// blocked by an asynchronous versus a synchronous save. Prints one JSON object per line.
//
// It is a function so that `meshtrain-bench checkpoint ...` can call it as a subcommand; the
// standalone `checkpoint_bench` binary is checkpoint_bench_main.cpp.
#pragma once

namespace meshtrain::bench {

// checkpoint_bench [--bytes N] [--dir DIR] [--repeats N] [--writers LIST] [--help]
// argv[0] is the program (or subcommand) name. Returns the process exit code.
int checkpoint_bench_main(int argc, char** argv);

}  // namespace meshtrain::bench
