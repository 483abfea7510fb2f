// Child processes of meshtrain-bench: started with fork/exec in a process group of their own,
// stdout captured through a pipe (stderr passes through to ours), and SIGKILLed (the whole
// group, so helpers they spawned die too) and reaped when the Child object dies. Children also
// get PR_SET_PDEATHSIG, so they die with the benchmark even if it is SIGKILLed itself.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "meshtrain/core.h"

namespace meshtrain::bench {

// Set by SIGINT / SIGTERM / SIGHUP once install_interrupt_handlers() ran; every wait in the
// benchmark polls it and gives up with an error, so RAII cleanup runs.
extern std::atomic<bool> g_interrupted;
void install_interrupt_handlers();
// Throws meshtrain::CancelledError when g_interrupted is set.
void throw_if_interrupted();

struct ExitStatus {
  bool signaled = false;
  int code = 0;  // exit code, or the signal number when signaled
  bool ok() const { return !signaled && code == 0; }
  std::string describe() const;  // "exit 3", "killed by SIGKILL"
};

class Child {
 public:
  struct Spec {
    std::string name;                // for messages: "worker 2", "coordinator"
    std::vector<std::string> argv;   // argv[0] is looked up in PATH when it has no '/'
    std::vector<std::pair<std::string, std::string>> env;  // set (overriding) in the child
    bool capture_stdout = true;      // false: stdout is inherited
    bool stdout_to_stderr = false;   // with capture_stdout false: send stdout to our stderr
    bool stdin_pipe = false;         // true: stdin is a pipe we hold open until close_stdin()
                                     // (a "go" signal); false: /dev/null
  };

  // Throws IoError when fork or pipe fails. A failed exec shows as exit code 127.
  explicit Child(Spec spec);
  ~Child();  // kill() then reap
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  const std::string& name() const { return spec_.name; }
  const std::vector<std::string>& argv() const { return spec_.argv; }
  pid_t pid() const { return pid_; }
  // The read end of the stdout pipe; -1 when not captured or after EOF.
  int stdout_fd() const { return out_fd_; }
  // Reads what is available without blocking; closes the pipe at EOF. Returns false at EOF.
  bool read_available();
  const std::string& output() const { return output_; }
  // The complete lines of the output so far.
  std::vector<std::string> lines() const;

  // Closes our end of the child's stdin pipe: the child reads EOF.
  void close_stdin();

  // Reaps without blocking; returns the status once the child exited.
  std::optional<ExitStatus> poll_exit();
  std::optional<ExitStatus> status() const { return status_; }
  // Waits until the child exits and its stdout reached EOF; nullopt when the timeout passes or
  // (when interruptible) g_interrupted is set.
  std::optional<ExitStatus> wait(std::chrono::milliseconds timeout, bool interruptible = true);
  // SIGKILL to the child's process group (and the child). No-op once reaped.
  void kill();

 private:
  Spec spec_;
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int in_fd_ = -1;
  std::string output_;
  std::optional<ExitStatus> status_;
};

// Runs a command to completion (stdout captured, or sent to our stderr; stderr inherited) with
// a timeout; returns the status and the captured stdout. Throws TimeoutError naming the command
// when it runs too long, CancelledError when interrupted (unless !interruptible: cleanup).
std::pair<ExitStatus, std::string> run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                                               std::vector<std::pair<std::string, std::string>> env = {},
                                               bool stdout_to_stderr = false, bool interruptible = true);

std::string shell_join(const std::vector<std::string>& argv);

}  // namespace meshtrain::bench
