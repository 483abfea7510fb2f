// checkpoint_bench: the standalone binary of the checkpoint benchmark (checkpoint_bench.h).
#include "checkpoint_bench.h"

int main(int argc, char** argv) { return meshtrain::bench::checkpoint_bench_main(argc, argv); }
