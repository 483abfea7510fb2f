// `meshtrain demo`: a local job on loopback that shows the step protocol at work.
#pragma once

namespace meshtrain::tools {

// meshtrain demo [--workers N] [--steps N] [--kill-at STEP] [--join-at STEP] ...
int demo_command(int argc, char** argv);
// The hidden `meshtrain demo-worker ...` the demo starts once per member.
int demo_worker_command(int argc, char** argv);

}  // namespace meshtrain::tools
