#include <cstring>

#include "meshtrain/core.h"

namespace meshtrain {

std::string_view error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::Timeout: return "Timeout";
    case ErrorCode::PeerLost: return "PeerLost";
    case ErrorCode::Protocol: return "Protocol";
    case ErrorCode::Auth: return "Auth";
    case ErrorCode::Corrupt: return "Corrupt";
    case ErrorCode::InvalidArgument: return "InvalidArgument";
    case ErrorCode::Io: return "Io";
    case ErrorCode::Cancelled: return "Cancelled";
    case ErrorCode::Internal: return "Internal";
  }
  return "Unknown";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(message), code_(code) {}

void throw_io_error(const std::string& what, int errno_value) {
  throw IoError(fmt::format("{}: {}", what, std::strerror(errno_value)), errno_value);
}

}  // namespace meshtrain
