// `meshtrain token` (mint or check a join token) and `meshtrain key` (create or show an Ed25519
// identity): what a job owner and a joining peer need for admission by join token
// (docs/step-protocol.md, "Admission").
#pragma once

namespace meshtrain::tools {

// meshtrain token --owner-key PEM --peer KEY --job KEY --expires DURATION [--label TEXT] [--out FILE]
// meshtrain token --show TOKEN|FILE [--owner KEY] [--job KEY] [--peer KEY]
int token_command(int argc, char** argv);

// meshtrain key generate PEM [--public-out FILE] | meshtrain key public PEM
int key_command(int argc, char** argv);

}  // namespace meshtrain::tools
