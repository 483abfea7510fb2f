// Internals shared by the checkpoint sources: POSIX file helpers, the global byte stream
// (segments over tensors and padding) and the save steps that save() and CheckpointWriter share.
// Not installed.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "meshtrain/checkpoint.h"

namespace meshtrain::json {
class Writer;
}

namespace meshtrain::checkpoint::detail {

namespace fs = std::filesystem;

// ---- files ----------------------------------------------------------------------------------

// An owned file descriptor.
class File {
 public:
  File() = default;
  explicit File(int fd) : fd_(fd) {}
  File(File&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  File& operator=(File&& o) noexcept;
  ~File();
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  // close() reporting its error (IoError naming `what`).
  void close(std::string_view what);

 private:
  int fd_ = -1;
};

// open(2) that throws IoError "<what> <path>: <strerror>" with errno.
File open_file(const fs::path& path, int flags, std::string_view what, mode_t mode = 0644);
// O_DIRECT reads and writes: buffer, file offset and length multiples of this (EINVAL from a
// filesystem that wants more sends the caller back to the page cache).
inline constexpr uint64_t kDirectAlignment = 4096;

// Writes everything at `offset`, looping over short writes and EINTR.
void pwrite_all(int fd, const void* data, size_t size, uint64_t offset, const fs::path& path);
void pwritev_all(int fd, std::vector<iovec>& iov, uint64_t offset, const fs::path& path);
// Reads exactly `size` bytes at `offset`; returns false on a short read (end of file).
bool pread_all(int fd, void* data, size_t size, uint64_t offset, const fs::path& path);
void fsync_fd(int fd, const fs::path& path);
void fsync_dir(const fs::path& dir);
// Creates `dir` (and parents) if needed; IoError with errno (ENOTDIR, EACCES, ...) naming it.
void make_dirs(const fs::path& dir);
// Writes `content` to dir/name through dir/name.tmp: write, fsync, rename, fsync dir.
void write_file_atomic(const fs::path& dir, std::string_view name, std::string_view content);
// Reads a whole file of at most max_bytes. ENOENT -> nullopt when missing_ok; over the limit ->
// CorruptError naming the file.
std::optional<std::string> read_small_file(const fs::path& path, size_t max_bytes, bool missing_ok);
void remove_tree(const fs::path& path);
// The step named by ROOT/latest; nullopt (logged) when missing or malformed.
std::optional<uint64_t> read_latest(const fs::path& root);
// dir holds a manifest.json (the checkpoint is complete).
bool is_complete(const fs::path& dir);

// ---- names ----------------------------------------------------------------------------------

std::string step_dir_name(uint64_t step);
// "step-<N>" with canonical decimal digits -> N.
std::optional<uint64_t> parse_step_dir_name(std::string_view name);
std::string shard_file_name(uint32_t rank, uint32_t world_size);
std::string sidecar_file_name(uint32_t rank, uint32_t world_size);
std::string digest_hex(const crypto::Digest& d);
crypto::Digest digest_of_blocks(const std::vector<crypto::Digest>& blocks);
std::string format_bytes(uint64_t bytes);  // "1.50 GiB"
// The manifest's "tensors" array (name, dtype, shape, offset, bytes), for the manifest and for
// `meshtrain checkpoint inspect --json`.
void write_tensors_json(json::Writer& w, const std::vector<TensorInfo>& tensors);

// ---- the global byte stream -----------------------------------------------------------------

struct Layout {
  std::vector<TensorInfo> tensors;
  uint64_t total_bytes = 0;
};

// A run of the global byte stream: `length` bytes at global `offset`, from `data`, or zeros
// (padding between tensors) when data is nullptr.
struct Segment {
  uint64_t offset = 0;
  uint64_t length = 0;
  const uint8_t* data = nullptr;
};

// Where the bytes of the global stream come from.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // The segments covering `range` (within the source's bytes), in order.
  virtual void segments(ByteRange range, std::vector<Segment>& out) const = 0;
};

// The caller's tensors (borrowed).
class StateSource : public ByteSource {
 public:
  StateSource(const Layout& layout, const State& state) : layout_(layout), state_(state) {}
  void segments(ByteRange range, std::vector<Segment>& out) const override;

 private:
  const Layout& layout_;
  const State& state_;
};

// One contiguous buffer holding global bytes [base, base + size).
class BufferSource : public ByteSource {
 public:
  BufferSource(uint64_t base, const uint8_t* data, uint64_t size) : base_(base), data_(data), size_(size) {}
  void segments(ByteRange range, std::vector<Segment>& out) const override;

 private:
  uint64_t base_;
  const uint8_t* data_;
  uint64_t size_;
};

Layout make_layout(const State& state);
crypto::Digest layout_digest(const std::vector<TensorInfo>& tensors, uint64_t total_bytes, uint64_t block_bytes);
// Validates metadata and blob names/values/sizes (InvalidArgumentError naming the key).
void check_metadata(const std::map<std::string, std::string>& metadata,
                    const std::map<std::string, std::vector<uint8_t>>& blobs, const ManifestLimits& limits);
void check_block_bytes(uint64_t block_bytes);
// Why `name` (a tensor, metadata key or blob name) is not allowed, or nullopt: it must be
// non-empty, at most 1024 bytes, UTF-8, without control characters (safe in JSON, logs and
// terminals). Saves refuse such names, and so do readers of a manifest.
std::optional<std::string> name_fault(std::string_view name);
// InvalidArgumentError when readers with `limits` would refuse this layout's manifest (too many
// tensors or bytes, or a manifest too large: too many blocks). Checked before anything is written.
void check_manifest_fits(const Layout& layout, uint64_t block_bytes, const ManifestLimits& limits);
// What every save checks before it writes anything: the layout of `state`, its metadata, and
// that readers with the default limits will accept the manifest (o.block_bytes already checked).
Layout layout_for_save(const State& state, const SaveOptions& o);

// ---- save steps -----------------------------------------------------------------------------

// What a save writes, however its bytes are held.
struct SaveJob {
  uint64_t step = 0;
  std::string save_id;
  const Layout* layout = nullptr;
  const std::map<std::string, std::string>* metadata = nullptr;
  const std::map<std::string, std::vector<uint8_t>>* blobs = nullptr;
  const ByteSource* source = nullptr;  // must cover this writer's range
};

// Validates options, fills in a save_id when allowed; InvalidArgumentError otherwise.
std::string resolve_save_id(const SaveOptions& options, std::string save_id);
SaveResult run_save(const fs::path& root, const SaveJob& job, const SaveOptions& options);
Manifest run_finalize(const fs::path& root, const SaveJob& job, const SaveOptions& options,
                      std::span<const ShardRecord> records);

// Hashes blocks of the global stream in parallel (threads) into per-block digests; used by the
// live transfer's sender.
std::vector<crypto::Digest> hash_blocks(const ByteSource& source, ByteRange range, uint64_t block_bytes,
                                        uint32_t threads);

// Builds the LoadedState's tensor list for `range` over the manifest's tensors.
std::vector<LoadedTensor> tensors_in_range(const Manifest& manifest, ByteRange range, const uint8_t* base);

}  // namespace meshtrain::checkpoint::detail
