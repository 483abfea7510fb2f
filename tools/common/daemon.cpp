#include "common/daemon.h"

#include <signal.h>
#include <unistd.h>

#include "checkpoint/internal.h"  // lib/checkpoint: write_file_atomic

namespace meshtrain::tools {

namespace fs = std::filesystem;

crypto::Identity load_or_create_identity(const fs::path& key, std::string_view component, std::string_view role) {
  std::error_code ec;
  if (fs::exists(key, ec)) return crypto::Identity::load_pem(key);
  auto id = crypto::Identity::generate();
  id.save_pem(key);
  log::info(component, "generated a new {} in {} (mode 0600); public key {}", role, key.string(),
            id.public_key().hex());
  return id;
}

void write_endpoint_file(const fs::path& path, const std::string& endpoint, const crypto::PublicKey& key) {
  fs::path dir = path.parent_path();
  checkpoint::detail::write_file_atomic(dir.empty() ? fs::path(".") : dir, path.filename().string(),
                                        fmt::format("{}\n{}\n", endpoint, key.hex()));
}

namespace {
CancelToken* g_stop = nullptr;
extern "C" void cancel_stop_token(int) {
  if (g_stop) g_stop->cancel();
}
}  // namespace

void cancel_on_stop_signals(CancelToken& stop) {
  g_stop = &stop;
  struct sigaction sa {};
  sa.sa_handler = cancel_stop_token;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

}  // namespace meshtrain::tools
