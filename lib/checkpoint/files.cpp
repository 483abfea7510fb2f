// POSIX file helpers with errors that name the file, checkpoint names, HostBuffer.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdlib>
#include <new>

#include "checkpoint/internal.h"

namespace meshtrain::checkpoint {

HostBuffer::HostBuffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  // Large buffers (snapshots, loaded states) are 2 MiB aligned and ask for transparent huge
  // pages: first touching a 1 GiB buffer then costs 512 page faults instead of 262144.
  constexpr size_t kHuge = 2u << 20;
  size_t align = bytes >= 2 * kHuge ? kHuge : kAlignmentBytes;
  size_t rounded = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (!p) throw std::bad_alloc();
  if (align == kHuge) ::madvise(p, rounded, MADV_HUGEPAGE);  // advisory: ignore failure
  data_.reset(static_cast<uint8_t*>(p));
}

void HostBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

namespace detail {

File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

void File::close(std::string_view what) {
  int fd = fd_;
  fd_ = -1;
  if (fd >= 0 && ::close(fd) != 0 && errno != EINTR) throw_io_error(fmt::format("closing {}", what), errno);
}

File open_file(const fs::path& path, int flags, std::string_view what, mode_t mode) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_io_error(fmt::format("cannot open {} {}", what, path.string()), errno);
  return File(fd);
}

void pwrite_all(int fd, const void* data, size_t size, uint64_t offset, const fs::path& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    size_t chunk = std::min<size_t>(size, 1u << 30);
    ssize_t n = ::pwrite(fd, p, chunk, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(fmt::format("writing {} at byte {}", path.string(), offset), errno);
    }
    if (n == 0) throw IoError(fmt::format("writing {} at byte {}: no progress", path.string(), offset), EIO);
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void pwritev_all(int fd, std::vector<iovec>& iov, uint64_t offset, const fs::path& path) {
  size_t first = 0;
  while (first < iov.size()) {
    int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = ::pwritev(fd, iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(fmt::format("writing {} at byte {}", path.string(), offset), errno);
    }
    if (n == 0) throw IoError(fmt::format("writing {} at byte {}: no progress", path.string(), offset), EIO);
    offset += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (left > 0 && first < iov.size()) {
      if (left >= iov[first].iov_len) {
        left -= iov[first].iov_len;
        ++first;
      } else {
        iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
        iov[first].iov_len -= left;
        left = 0;
      }
    }
    while (first < iov.size() && iov[first].iov_len == 0) ++first;
  }
}

bool pread_all(int fd, void* data, size_t size, uint64_t offset, const fs::path& path) {
  auto* p = static_cast<uint8_t*>(data);
  while (size > 0) {
    size_t chunk = std::min<size_t>(size, 1u << 30);
    ssize_t n = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(fmt::format("reading {} at byte {}", path.string(), offset), errno);
    }
    if (n == 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return true;
}

void fsync_fd(int fd, const fs::path& path) {
  if (::fsync(fd) != 0) throw_io_error(fmt::format("fsync {}", path.string()), errno);
}

void fsync_dir(const fs::path& dir) {
  File f = open_file(dir, O_RDONLY | O_DIRECTORY, "directory");
  fsync_fd(f.get(), dir);
  f.close(dir.string());
}

void make_dirs(const fs::path& dir) {
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return;
  // Create parents first so the error names the component that failed.
  fs::path parent = dir.parent_path();
  if (!parent.empty() && parent != dir) make_dirs(parent);
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    throw_io_error(fmt::format("cannot create directory {}", dir.string()), errno);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) throw_io_error(fmt::format("cannot create directory {}", dir.string()), errno);
  if (!S_ISDIR(st.st_mode))
    throw IoError(fmt::format("cannot create directory {}: a file of that name exists", dir.string()), ENOTDIR);
}

void write_file_atomic(const fs::path& dir, std::string_view name, std::string_view content) {
  fs::path final_path = dir / std::string(name);
  fs::path tmp = dir / (std::string(name) + ".tmp");
  {
    File f = open_file(tmp, O_WRONLY | O_CREAT | O_TRUNC, "file");
    pwrite_all(f.get(), content.data(), content.size(), 0, tmp);
    fsync_fd(f.get(), tmp);
    f.close(tmp.string());
  }
  if (::rename(tmp.c_str(), final_path.c_str()) != 0)
    throw_io_error(fmt::format("renaming {} to {}", tmp.string(), final_path.string()), errno);
  fsync_dir(dir);
}

std::optional<std::string> read_small_file(const fs::path& path, size_t max_bytes, bool missing_ok) {
  // O_NONBLOCK: a FIFO in a file's place must not block the open (the check below refuses it).
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT && missing_ok) return std::nullopt;
    throw_io_error(fmt::format("cannot open {}", path.string()), errno);
  }
  File f(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_io_error(fmt::format("stat {}", path.string()), errno);
  if (!S_ISREG(st.st_mode)) throw IoError(fmt::format("{} is not a regular file", path.string()), EINVAL);
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    throw CorruptError(fmt::format("{}: {} bytes is over the limit of {} bytes", path.string(), st.st_size, max_bytes));
  std::string out(static_cast<size_t>(st.st_size), '\0');
  // The file may change size under us; read what fstat said and check for more.
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error(fmt::format("reading {}", path.string()), errno);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

void remove_tree(const fs::path& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) throw IoError(fmt::format("cannot remove {}: {}", path.string(), ec.message()), ec.value());
}

std::string step_dir_name(uint64_t step) { return fmt::format("step-{}", step); }

std::optional<uint64_t> parse_step_dir_name(std::string_view name) {
  constexpr std::string_view prefix = "step-";
  if (name.substr(0, prefix.size()) != prefix) return std::nullopt;
  std::string_view digits = name.substr(prefix.size());
  if (digits.empty() || digits.size() > 20) return std::nullopt;
  if (digits.size() > 1 && digits[0] == '0') return std::nullopt;  // one spelling per step
  uint64_t step = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return step;
}

std::string shard_file_name(uint32_t rank, uint32_t world_size) {
  return fmt::format("shard-{}-of-{}.bin", rank, world_size);
}

std::string sidecar_file_name(uint32_t rank, uint32_t world_size) {
  return fmt::format("shard-{}-of-{}.json", rank, world_size);
}

std::string digest_hex(const crypto::Digest& d) { return crypto::to_hex(d); }

crypto::Digest digest_of_blocks(const std::vector<crypto::Digest>& blocks) {
  crypto::Sha256 h;
  for (const auto& b : blocks) h.update(b);
  return h.finish();
}

std::string format_bytes(uint64_t bytes) {
  if (bytes < 1024) return fmt::format("{} B", bytes);
  const char* units[] = {"KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = -1;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return fmt::format("{:.2f} {}", v, units[u]);
}

}  // namespace detail
}  // namespace meshtrain::checkpoint
