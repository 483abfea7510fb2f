#include "child.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <map>
#include <thread>

extern char** environ;

namespace meshtrain::bench {

std::atomic<bool> g_interrupted{false};

namespace {

extern "C" void on_interrupt(int) { g_interrupted.store(true); }

}  // namespace

void install_interrupt_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

void throw_if_interrupted() {
  if (g_interrupted.load()) throw CancelledError("interrupted by a signal; stopping and cleaning up");
}

std::string ExitStatus::describe() const {
  if (!signaled) return fmt::format("exit {}", code);
  const char* name = sigabbrev_np(code);
  return name ? fmt::format("killed by SIG{}", name) : fmt::format("killed by signal {}", code);
}

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                   "_-./:=,@+%") == std::string::npos;
    out += (out.empty() ? "" : " ") + (plain ? a : "'" + a + "'");
  }
  return out;
}

Child::Child(Spec spec) : spec_(std::move(spec)) {
  // Everything the child needs is prepared before fork: after it only async-signal-safe calls.
  std::map<std::string, std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string kv = *e;
    auto eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  for (const auto& [k, v] : spec_.env) env[k] = v;
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = spec_.argv;
  std::vector<char*> argv;
  for (auto& a : argv_copy) argv.push_back(a.data());
  argv.push_back(nullptr);

  int fds[2] = {-1, -1};
  int in[2] = {-1, -1};
  if (spec_.capture_stdout && ::pipe2(fds, O_CLOEXEC) != 0) throw_io_error("pipe for " + spec_.name, errno);
  if (spec_.stdin_pipe && ::pipe2(in, O_CLOEXEC) != 0) {
    int err = errno;
    if (fds[0] >= 0) {
      ::close(fds[0]);
      ::close(fds[1]);
    }
    throw_io_error("pipe for " + spec_.name, err);
  }
  const int dev_null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) {
    int err = errno;
    for (int fd : {fds[0], fds[1], in[0], in[1], dev_null})
      if (fd >= 0) ::close(fd);
    throw_io_error("fork for " + spec_.name, err);
  }
  if (pid_ == 0) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) _exit(126);  // the parent died before prctl
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) ::sigaction(sig, &dfl, nullptr);
    if (in[0] >= 0) ::dup2(in[0], STDIN_FILENO);
    else if (dev_null >= 0) ::dup2(dev_null, STDIN_FILENO);
    if (fds[1] >= 0) ::dup2(fds[1], STDOUT_FILENO);
    else if (spec_.stdout_to_stderr) ::dup2(STDERR_FILENO, STDOUT_FILENO);
    ::execvpe(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  ::setpgid(pid_, pid_);  // also here, so kill(-pid) works even before the child ran
  if (dev_null >= 0) ::close(dev_null);
  if (in[0] >= 0) {
    ::close(in[0]);
    in_fd_ = in[1];
  }
  if (fds[1] >= 0) {
    ::close(fds[1]);
    out_fd_ = fds[0];
    ::fcntl(out_fd_, F_SETFL, ::fcntl(out_fd_, F_GETFL) | O_NONBLOCK);
  }
}

Child::~Child() {
  kill();
  if (pid_ > 0 && !status_) {
    int st = 0;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
  }
  if (out_fd_ >= 0) ::close(out_fd_);
  close_stdin();
}

void Child::close_stdin() {
  if (in_fd_ >= 0) ::close(in_fd_);
  in_fd_ = -1;
}

void Child::kill() {
  if (pid_ <= 0) return;
  ::kill(-pid_, SIGKILL);  // the group: helpers the child started (python's ranks)
  if (!status_) ::kill(pid_, SIGKILL);
}

bool Child::read_available() {
  if (out_fd_ < 0) return false;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(out_fd_, buf, sizeof buf);
    if (n > 0) {
      output_.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    ::close(out_fd_);  // EOF or error
    out_fd_ = -1;
    return false;
  }
}

std::vector<std::string> Child::lines() const {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t nl; (nl = output_.find('\n', start)) != std::string::npos; start = nl + 1)
    out.push_back(output_.substr(start, nl - start));
  return out;
}

std::optional<ExitStatus> Child::poll_exit() {
  if (status_ || pid_ <= 0) return status_;
  int st = 0;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    ExitStatus s;
    s.signaled = WIFSIGNALED(st);
    s.code = s.signaled ? WTERMSIG(st) : WEXITSTATUS(st);
    status_ = s;
  }
  return status_;
}

std::optional<ExitStatus> Child::wait(std::chrono::milliseconds timeout, bool interruptible) {
  auto until = Clock::now() + timeout;
  for (;;) {
    if (out_fd_ >= 0) {
      pollfd p{out_fd_, POLLIN, 0};
      ::poll(&p, 1, 20);
      read_available();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (poll_exit() && out_fd_ < 0) return status_;
    if ((interruptible && g_interrupted.load()) || Clock::now() >= until) return std::nullopt;
  }
}

std::pair<ExitStatus, std::string> run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                                               std::vector<std::pair<std::string, std::string>> env,
                                               bool stdout_to_stderr, bool interruptible) {
  Child::Spec spec;
  spec.name = argv.empty() ? "command" : argv[0];
  spec.argv = argv;
  spec.env = std::move(env);
  spec.capture_stdout = !stdout_to_stderr;
  spec.stdout_to_stderr = stdout_to_stderr;
  Child child(std::move(spec));
  auto status = child.wait(timeout, interruptible);
  if (!status) {
    if (interruptible) throw_if_interrupted();
    throw TimeoutError(fmt::format("'{}' did not finish within {} s", shell_join(argv), timeout.count() / 1000.0));
  }
  return {*status, child.output()};
}

}  // namespace meshtrain::bench
