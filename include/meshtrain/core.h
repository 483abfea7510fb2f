// meshtrain core: errors, logging, deadlines and cancellation.
//
// Everything else in meshtrain builds on these. Errors are exceptions derived from
// meshtrain::Error; each carries an ErrorCode and a message that names what is at fault
// (peer, file, field, limit).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace meshtrain {

enum class ErrorCode : int {
  Timeout = 1,          // a wait ran past its deadline
  PeerLost = 2,         // a peer died, closed its connection or went silent
  Protocol = 3,         // malformed, oversized, stale or out-of-order message
  Auth = 4,             // bad signature, unknown key, refused identity
  Corrupt = 5,          // data failed a hash or tag check
  InvalidArgument = 6,  // the caller passed something unusable
  Io = 7,               // file or socket system call failed
  Cancelled = 8,        // the operation was cancelled through a CancelToken
  Internal = 9,         // a library call failed in a way that should not happen
};

std::string_view error_code_name(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

class TimeoutError : public Error {
 public:
  explicit TimeoutError(const std::string& m) : Error(ErrorCode::Timeout, m) {}
};
// Names the lost peer: peer() is its printable id (fingerprint) so callers can act on it.
class PeerLostError : public Error {
 public:
  PeerLostError(std::string peer, const std::string& m)
      : Error(ErrorCode::PeerLost, m), peer_(std::move(peer)) {}
  const std::string& peer() const noexcept { return peer_; }

 private:
  std::string peer_;
};
class ProtocolError : public Error {
 public:
  explicit ProtocolError(const std::string& m) : Error(ErrorCode::Protocol, m) {}
};
class AuthError : public Error {
 public:
  explicit AuthError(const std::string& m) : Error(ErrorCode::Auth, m) {}
};
class CorruptError : public Error {
 public:
  explicit CorruptError(const std::string& m) : Error(ErrorCode::Corrupt, m) {}
};
class InvalidArgumentError : public Error {
 public:
  explicit InvalidArgumentError(const std::string& m) : Error(ErrorCode::InvalidArgument, m) {}
};
class IoError : public Error {
 public:
  // errno_value is kept so callers can tell ENOSPC from EACCES; 0 when not from a syscall.
  IoError(const std::string& m, int errno_value = 0)
      : Error(ErrorCode::Io, m), errno_value_(errno_value) {}
  int errno_value() const noexcept { return errno_value_; }

 private:
  int errno_value_;
};
class CancelledError : public Error {
 public:
  explicit CancelledError(const std::string& m) : Error(ErrorCode::Cancelled, m) {}
};
class InternalError : public Error {
 public:
  explicit InternalError(const std::string& m) : Error(ErrorCode::Internal, m) {}
};

// "<what>: <strerror(errno_value)>" as an IoError. Used after a failed system call.
[[noreturn]] void throw_io_error(const std::string& what, int errno_value);

// ---------------------------------------------------------------------------------------------
// Logging. Level and per-component overrides come from MESHTRAIN_LOG, read once:
//   MESHTRAIN_LOG=info              everything at info and above
//   MESHTRAIN_LOG=warn,net=debug    warn by default, debug for the "net" component
// Levels: trace, debug, info, warn, error, off. Default: info. Lines go to stderr as
//   2026-11-26T20:41:43.123Z W net[1234] message
namespace log {

enum class Level : int { Trace = 0, Debug, Info, Warn, Error, Off };

// Parses a MESHTRAIN_LOG spec; throws InvalidArgumentError naming the bad token.
void configure(std::string_view spec);
bool enabled(Level level, std::string_view component) noexcept;
void write(Level level, std::string_view component, std::string_view message) noexcept;

template <typename... Args>
void emit(Level level, std::string_view component, fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level, component)) write(level, component, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void debug(std::string_view c, fmt::format_string<Args...> f, Args&&... a) {
  emit(Level::Debug, c, f, std::forward<Args>(a)...);
}
template <typename... Args>
void info(std::string_view c, fmt::format_string<Args...> f, Args&&... a) {
  emit(Level::Info, c, f, std::forward<Args>(a)...);
}
template <typename... Args>
void warn(std::string_view c, fmt::format_string<Args...> f, Args&&... a) {
  emit(Level::Warn, c, f, std::forward<Args>(a)...);
}
template <typename... Args>
void error(std::string_view c, fmt::format_string<Args...> f, Args&&... a) {
  emit(Level::Error, c, f, std::forward<Args>(a)...);
}

}  // namespace log

// ---------------------------------------------------------------------------------------------
// Time. All waits in meshtrain take a Deadline (an absolute steady-clock point) so that a
// chain of calls shares one budget instead of each restarting its own timeout.
using Clock = std::chrono::steady_clock;

class Deadline {
 public:
  static Deadline after(std::chrono::milliseconds timeout) { return Deadline(Clock::now() + timeout); }
  static Deadline never() { return Deadline(Clock::time_point::max()); }
  explicit Deadline(Clock::time_point at) : at_(at) {}

  bool expired() const { return Clock::now() >= at_; }
  bool is_never() const { return at_ == Clock::time_point::max(); }
  // Milliseconds left, clamped to [0, INT32_MAX]; -1 for never (poll()'s "infinite").
  int remaining_ms() const;
  Clock::time_point at() const { return at_; }

 private:
  Clock::time_point at_;
};

// A cancel path for blocking calls. cancel() wakes every wait that polls fd() (an eventfd that
// becomes readable once cancelled); cancelled() is a cheap check. Thread-safe; cancelling is
// permanent. Share one token between the threads of one operation.
class CancelToken {
 public:
  CancelToken();
  ~CancelToken();
  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;

  void cancel() noexcept;
  bool cancelled() const noexcept { return cancelled_.load(std::memory_order_acquire); }
  int fd() const noexcept { return fd_; }
  // Throws CancelledError("<what> cancelled") when cancelled.
  void throw_if_cancelled(std::string_view what) const;

 private:
  int fd_ = -1;
  std::atomic<bool> cancelled_{false};
};

// ---------------------------------------------------------------------------------------------
// Plain buffers, so that non-torch code (collectives, codecs, checkpoints) can work without
// torch headers. A BufferView borrows; it never owns.
enum class DType : uint8_t { Float32 = 0, Float16 = 1, BFloat16 = 2, Int64 = 3, UInt8 = 4, Int32 = 5 };
enum class DeviceKind : uint8_t { Cpu = 0, Cuda = 1 };

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype) noexcept;

struct BufferView {
  void* data = nullptr;
  size_t count = 0;  // elements, not bytes
  DType dtype = DType::Float32;
  DeviceKind device = DeviceKind::Cpu;
  int device_index = 0;

  size_t bytes() const { return count * dtype_size(dtype); }
};

}  // namespace meshtrain
