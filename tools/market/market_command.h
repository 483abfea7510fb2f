#pragma once

namespace meshtrain::tools {

// `meshtrain market COMMAND ...` (argv[1] == "market").
int market_command(int argc, char** argv);

}  // namespace meshtrain::tools
