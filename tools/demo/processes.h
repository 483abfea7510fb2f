// What `meshtrain demo` and `meshtrain demo --market` share: their settings, child processes
// that die with the demo, and reading the workers' progress files.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::tools {

// Rows of the least-squares problem each worker holds (its samples per step).
inline constexpr uint64_t kRowsPerWorker = 512;

struct DemoSettings {
  uint64_t workers = 4;
  uint64_t steps = 40;
  uint64_t kill_at = 15;
  uint64_t join_at = 25;
  uint64_t dim = 1024;
  uint64_t step_ms = 50;
  bool plain = false;
  double cloud_price_per_gpu_hour = 0;  // --market: compare the spend with this cloud price (0: no comparison)
};

// `meshtrain demo --market` (tools/demo/market_demo.cpp).
int market_demo(const DemoSettings& settings);

inline std::filesystem::path self_exe() { return std::filesystem::read_symlink("/proc/self/exe"); }

// A child process, SIGKILLed and reaped when the object dies.
struct Child {
  pid_t pid = -1;
  std::string name;
  ~Child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  int wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

// Starts args[0]; its stdout (and stderr with `both`) goes to `output_path` when given.
inline std::unique_ptr<Child> spawn(const std::string& name, std::vector<std::string> args,
                                    const char* output_path = nullptr, bool both = false) {
  auto child = std::make_unique<Child>();
  child->name = name;
  child->pid = ::fork();
  if (child->pid < 0) throw_io_error("fork", errno);
  if (child->pid == 0) {
    if (output_path) {
      int fd = ::open(output_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd >= 0) {
        ::dup2(fd, STDOUT_FILENO);
        if (both) ::dup2(fd, STDERR_FILENO);
      }
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::perror("execv");
    _exit(127);
  }
  return child;
}

// A daemon's --print-endpoint-file: its endpoint and its public key.
struct Endpoint {
  std::string endpoint;
  crypto::PublicKey key;
};

// Waits up to `timeout` for `child` (named `who`) to write its endpoint file. IoError when the
// child exits first, TimeoutError when the time is up.
inline Endpoint wait_endpoint(const std::filesystem::path& file, Child& child, std::string_view who,
                              std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  auto until = Clock::now() + timeout;
  for (;;) {
    std::ifstream in(file);
    std::string endpoint, key;
    if (in >> endpoint >> key && key.size() == 64) return {endpoint, crypto::PublicKey::from_hex(key, who)};
    int status = 0;
    if (::waitpid(child.pid, &status, WNOHANG) == child.pid) {
      child.pid = -1;
      throw IoError(fmt::format("{} exited before it was ready (see {})", who, file.parent_path().string()), 0);
    }
    if (Clock::now() >= until)
      throw TimeoutError(fmt::format("{} was not ready within {} s", who, timeout.count() / 1000));
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// The meshtrain executable `name` next to `exe` (they are built and installed together).
inline std::filesystem::path sibling(const std::filesystem::path& exe, const char* name) {
  std::filesystem::path p = exe.parent_path() / name;
  if (!std::filesystem::exists(p))
    throw IoError(fmt::format("{} not found next to {} (expected {})", name, exe.string(), p.string()), ENOENT);
  return p;
}

struct Progress {
  uint64_t step = 0;  // the last step the worker finished; 0: none yet
  double loss = 0;
};

// A worker's progress file: one "STEP LOSS" line per finished step.
inline std::vector<Progress> read_progress(const std::filesystem::path& progress) {
  std::ifstream in(progress);
  std::vector<Progress> steps;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    Progress p;
    if (fields >> p.step >> p.loss) steps.push_back(p);
  }
  return steps;
}

inline Progress last_progress(const std::filesystem::path& progress) {
  auto steps = read_progress(progress);
  return steps.empty() ? Progress{} : steps.back();
}

}  // namespace meshtrain::tools
