// What meshtrain's daemons share at start-up: their identity file, the endpoint file tests and
// scripts wait for, and a clean stop on SIGINT / SIGTERM.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::tools {

// Loads the Ed25519 identity at `key`, or creates it (mode 0600) when the file does not exist;
// `component` and `role` name it in the log line ("market", "market identity").
crypto::Identity load_or_create_identity(const std::filesystem::path& key, std::string_view component,
                                         std::string_view role);

// Writes "<endpoint>\n<public key hex>\n" through a temporary file and a rename, so a reader
// never sees half a file.
void write_endpoint_file(const std::filesystem::path& path, const std::string& endpoint, const crypto::PublicKey& key);

// SIGINT and SIGTERM cancel `stop` (async-signal-safe); SIGPIPE is ignored. `stop` must outlive
// the process's use of the handlers.
void cancel_on_stop_signals(CancelToken& stop);

}  // namespace meshtrain::tools
