// `meshtrain checkpoint`: inspect, verify and list checkpoints (docs/checkpoints.md).
#pragma once

namespace meshtrain::tools {

// meshtrain checkpoint inspect|verify|list PATH [--json]
int checkpoint_command(int argc, char** argv);

}  // namespace meshtrain::tools
