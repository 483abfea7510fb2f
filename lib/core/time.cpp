#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <climits>

#include "meshtrain/core.h"

namespace meshtrain {

int Deadline::remaining_ms() const {
  if (is_never()) return -1;
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(at_ - Clock::now()).count();
  if (left <= 0) return 0;
  // Round up so a wait never ends just before the deadline and spins.
  return left >= INT_MAX ? INT_MAX : static_cast<int>(left) + 1;
}

CancelToken::CancelToken() {
  fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd_ < 0) throw_io_error("CancelToken: eventfd", errno);
}

CancelToken::~CancelToken() {
  if (fd_ >= 0) ::close(fd_);
}

void CancelToken::cancel() noexcept {
  if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
  uint64_t one = 1;
  // The eventfd stays readable from now on: nothing ever reads it.
  [[maybe_unused]] ssize_t n = ::write(fd_, &one, sizeof one);
}

void CancelToken::throw_if_cancelled(std::string_view what) const {
  if (cancelled()) throw CancelledError(fmt::format("{} cancelled", what));
}

}  // namespace meshtrain
