// Loading: open (manifest), read ranges block by block from whichever shards hold them, each
// block verified against its SHA-256 before its bytes are handed out; verify().
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include <fmt/ranges.h>

#include "checkpoint/internal.h"

namespace meshtrain::checkpoint {

namespace {

using namespace detail;

// Receives verified bytes of a range. direct(): where a whole block of the range may be read in
// place (nullptr: read into scratch and deliver()). Called from several threads for disjoint
// ranges.
class Sink {
 public:
  virtual ~Sink() = default;
  virtual uint8_t* direct(ByteRange block) = 0;
  virtual void deliver(uint64_t global_offset, std::span<const uint8_t> bytes) = 0;
};

class ContiguousSink : public Sink {
 public:
  ContiguousSink(ByteRange range, std::span<uint8_t> dest) : range_(range), dest_(dest) {}
  uint8_t* direct(ByteRange b) override { return dest_.data() + (b.begin - range_.begin); }
  void deliver(uint64_t off, std::span<const uint8_t> bytes) override {
    std::memcpy(dest_.data() + (off - range_.begin), bytes.data(), bytes.size());
  }

 private:
  ByteRange range_;
  std::span<uint8_t> dest_;
};

// Scatters into the caller's tensors.
class ScatterSink : public Sink {
 public:
  struct Target {
    uint64_t offset;
    uint64_t bytes;
    uint8_t* data;
  };
  explicit ScatterSink(std::vector<Target> targets) : targets_(std::move(targets)) {
    std::sort(targets_.begin(), targets_.end(), [](const Target& a, const Target& b) { return a.offset < b.offset; });
  }
  uint8_t* direct(ByteRange) override { return nullptr; }
  void deliver(uint64_t off, std::span<const uint8_t> bytes) override {
    uint64_t end = off + bytes.size();
    auto it = std::upper_bound(targets_.begin(), targets_.end(), off,
                               [](uint64_t pos, const Target& t) { return pos < t.offset + t.bytes; });
    for (; it != targets_.end() && it->offset < end; ++it) {
      uint64_t b = std::max(off, it->offset);
      uint64_t e = std::min(end, it->offset + it->bytes);
      if (b < e) std::memcpy(it->data + (b - it->offset), bytes.data() + (b - off), e - b);
    }
  }

 private:
  std::vector<Target> targets_;
};

struct OpenShard {
  const ShardInfo* info = nullptr;
  fs::path path;
  File file;
  // The same file opened with O_DIRECT (invalid where the filesystem refuses it): aligned whole
  // blocks are read with it straight from the disk into their destination, skipping the page
  // cache copy, which costs about as much CPU as hashing half of the bytes.
  File direct;
};


std::string where(const fs::path& dir, const ShardInfo& s) {
  return fmt::format("checkpoint {}: shard file {} (written by rank {}, global bytes [{}, {}))", dir.string(), s.file,
                     s.rank, s.range.begin, s.range.end);
}

// A shard file is a regular file of exactly its range's size: else CorruptError naming it.
void check_shard_file(const fs::path& dir, const ShardInfo& s, const struct stat& st) {
  if (!S_ISREG(st.st_mode)) throw CorruptError(fmt::format("{} is not a regular file", where(dir, s)));
  const uint64_t size = static_cast<uint64_t>(st.st_size), want = s.range.size();
  if (size < want)
    throw CorruptError(fmt::format("{} is truncated: {} bytes, the manifest says {}", where(dir, s), size, want));
  if (size > want) throw CorruptError(fmt::format("{} has {} bytes, the manifest says {}", where(dir, s), size, want));
}

// Opens a shard and checks its size. Missing or wrong size: CorruptError naming it.
OpenShard open_shard(const fs::path& dir, const ShardInfo& s) {
  OpenShard o;
  o.info = &s;
  o.path = dir / s.file;
  // O_NONBLOCK: a FIFO in the shard's place must not block the open (refused below).
  int fd = ::open(o.path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT) throw CorruptError(fmt::format("{} is missing", where(dir, s)));
    throw_io_error(fmt::format("{}: cannot open", where(dir, s)), errno);
  }
  o.file = File(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_io_error(fmt::format("{}: stat", where(dir, s)), errno);
  check_shard_file(dir, s, st);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  int direct = ::open(o.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (direct >= 0) o.direct = File(direct);
  return o;
}

// open_shard's checks by path, without keeping the file open: a reader checks every shard it
// needs before reading any, and opens each only while it reads it (ShardFiles).
void check_shard(const fs::path& dir, const ShardInfo& s) {
  struct stat st {};
  if (::stat((dir / s.file).c_str(), &st) != 0) {
    if (errno == ENOENT) throw CorruptError(fmt::format("{} is missing", where(dir, s)));
    throw_io_error(fmt::format("{}: stat", where(dir, s)), errno);
  }
  check_shard_file(dir, s, st);
}

// The shards' files, each opened when a block of it is first read and closed after its last
// one. Blocks are read in shard order, so about io_threads shards are open at once (two
// descriptors each) however many writers there were: opening them all first ran out of file
// descriptors under the usual limit of 1024 from about 500 writers.
class ShardFiles {
 public:
  ShardFiles(fs::path dir, std::vector<const ShardInfo*> infos, const std::vector<uint64_t>& blocks)
      : dir_(std::move(dir)), shards_(infos.size()) {
    for (size_t i = 0; i < infos.size(); ++i) {
      shards_[i].info = infos[i];
      shards_[i].remaining = blocks[i];
    }
  }
  // Shard i, open (the caller holds it while reading; done() after each block).
  std::shared_ptr<const OpenShard> acquire(size_t i) {
    Slot& slot = shards_[i];
    std::lock_guard lock(slot.mutex);
    if (!slot.open) slot.open = std::make_shared<OpenShard>(open_shard(dir_, *slot.info));
    return slot.open;
  }
  // One block of shard i read (or given up): after the last one the file closes, once the last
  // holder lets go.
  void done(size_t i) {
    Slot& slot = shards_[i];
    std::lock_guard lock(slot.mutex);
    if (slot.remaining > 0 && --slot.remaining == 0) slot.open.reset();
  }

 private:
  struct Slot {
    const ShardInfo* info = nullptr;
    std::mutex mutex;
    std::shared_ptr<OpenShard> open;
    uint64_t remaining = 0;
  };
  fs::path dir_;
  std::vector<Slot> shards_;
};

struct BlockTask {
  size_t shard;  // index into the open shards
  uint64_t block;
};

// I/O size of the bounce path: one request of the disk's largest size (max_sectors_kb is 4 MiB
// here); a bounce buffer per reader thread stays within the L3 cache. At 4 MiB and more a
// HostBuffer is 2 MiB aligned, as O_DIRECT needs (smaller ones are only 64-byte aligned).
constexpr size_t kBounceChunkBytes = size_t{4} << 20;
constexpr size_t kHashPieceBytes = size_t{256} << 10;

bool is_direct_aligned(uint64_t x) { return x % kDirectAlignment == 0; }

// Reads `size` bytes at the 4 KiB aligned `file_off` into `dest` (any alignment) with O_DIRECT
// through the aligned `bounce` buffer, chunk by chunk, hashing the bytes as they land in `dest`.
// Cheaper than the page cache for a destination that O_DIRECT cannot fill in place: one copy from
// a hot buffer instead of the kernel's copy, a cold copy and page-cache upkeep. A short read (end
// of file) or an O_DIRECT refusal finishes the chunk through the page cache. False: the file
// ends before `size` bytes.
bool read_through_bounce(const OpenShard& s, uint64_t file_off, uint8_t* dest, size_t size, HostBuffer& bounce,
                         crypto::Sha256& sha) {
  if (bounce.size() < kBounceChunkBytes) bounce = HostBuffer(kBounceChunkBytes);
  for (size_t done = 0; done < size;) {
    size_t want = std::min(size - done, kBounceChunkBytes);
    // Rounded up to whole 4 KiB pages as O_DIRECT requires; bytes past `want` are not used.
    size_t request = (want + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
    uint64_t off = file_off + done;
    ssize_t n;
    do {
      n = ::pread(s.direct.get(), bounce.data(), request, static_cast<off_t>(off));
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EINVAL) throw_io_error(fmt::format("reading {} at byte {}", s.path.string(), off), errno);
    size_t got = n < 0 ? 0 : std::min(static_cast<size_t>(n), want);
    if (got < want && !pread_all(s.file.get(), bounce.data() + got, want - got, off + got, s.path)) return false;
    // Copied and hashed in pieces so that each piece is hashed while it is still in the cache.
    for (size_t p = 0; p < want; p += kHashPieceBytes) {
      size_t len = std::min(kHashPieceBytes, want - p);
      std::memcpy(dest + done + p, bounce.data() + p, len);
      sha.update({dest + done + p, len});
    }
    done += want;
  }
  return true;
}

// Reads block `k` of its shard into `buf` and checks its digest, computed from the bytes in
// `buf`. `bounce` (may be null) lets a block that O_DIRECT cannot read in place still bypass the
// page cache.
void read_block(const fs::path& dir, const OpenShard& s, uint64_t block_bytes, uint64_t k, uint8_t* buf, size_t size,
                HostBuffer* bounce = nullptr) {
  uint64_t file_off = k * block_bytes;
  bool direct = s.direct && is_direct_aligned(file_off);
  bool in_place = direct && is_direct_aligned(reinterpret_cast<uintptr_t>(buf)) && is_direct_aligned(size);
  bool complete;
  crypto::Digest d;
  if (direct && !in_place && bounce) {
    crypto::Sha256 sha;
    complete = read_through_bounce(s, file_off, buf, size, *bounce, sha);
    if (complete) d = sha.finish();
  } else {
    try {
      complete = pread_all(in_place ? s.direct.get() : s.file.get(), buf, size, file_off, s.path);
    } catch (const IoError& e) {
      if (!in_place || e.errno_value() != EINVAL) throw;
      complete = pread_all(s.file.get(), buf, size, file_off, s.path);  // a stricter O_DIRECT alignment
    }
    if (complete) d = crypto::sha256({buf, size});
  }
  if (!complete)
    throw CorruptError(fmt::format("{} is truncated: ends inside block {}", where(dir, *s.info), k));
  if (d != s.info->block_sha256[k])
    throw CorruptError(fmt::format("{} is damaged: block {} (file bytes [{}, {})) fails its SHA-256 check",
                                   where(dir, *s.info), k, file_off, file_off + size));
}

void read_blocks(const fs::path& dir, const Manifest& m, ByteRange range, uint32_t io_threads, Sink& sink) {
  if (range.begin > range.end || range.end > m.total_bytes)
    throw InvalidArgumentError(fmt::format("checkpoint {}: range [{}, {}) is outside the state's {} bytes",
                                           dir.string(), range.begin, range.end, m.total_bytes));
  if (range.size() == 0) return;
  const uint64_t B = m.block_bytes;
  std::vector<const ShardInfo*> needed;
  std::vector<uint64_t> blocks;
  std::vector<BlockTask> tasks;
  for (const auto& s : m.shards) {
    uint64_t b = std::max(s.range.begin, range.begin);
    uint64_t e = std::min(s.range.end, range.end);
    if (b >= e) continue;
    check_shard(dir, s);  // all of them before reading any
    needed.push_back(&s);
    const uint64_t first = (b - s.range.begin) / B, last = (e - 1 - s.range.begin) / B;
    blocks.push_back(last - first + 1);
    for (uint64_t k = first; k <= last; ++k) tasks.push_back({needed.size() - 1, k});
  }
  ShardFiles shards(dir, std::move(needed), blocks);
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex m_err;
  std::exception_ptr error;
  auto work = [&] {
    HostBuffer scratch;
    HostBuffer bounce;
    try {
      while (!stop) {
        size_t i = next++;
        if (i >= tasks.size()) break;
        const std::shared_ptr<const OpenShard> held = shards.acquire(tasks[i].shard);
        const OpenShard& s = *held;
        uint64_t k = tasks[i].block;
        ByteRange g{s.info->range.begin + k * B, std::min(s.info->range.begin + (k + 1) * B, s.info->range.end)};
        ByteRange part{std::max(g.begin, range.begin), std::min(g.end, range.end)};
        uint8_t* target = part == g ? sink.direct(g) : nullptr;
        if (!target) {
          if (scratch.size() < B) scratch = HostBuffer(B);
          read_block(dir, s, B, k, scratch.data(), g.size());
          sink.deliver(part.begin, {scratch.data() + (part.begin - g.begin), part.size()});
        } else {
          read_block(dir, s, B, k, target, g.size(), &bounce);
        }
        shards.done(tasks[i].shard);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(m_err);
      if (!error) error = std::current_exception();
      stop = true;
    }
  };
  size_t n = std::clamp<size_t>(io_threads, 1, tasks.size());
  std::vector<std::thread> pool;
  for (size_t i = 1; i < n; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace

Checkpoint::Checkpoint(fs::path dir, Manifest manifest, LoadOptions options)
    : dir_(std::move(dir)), manifest_(std::move(manifest)), options_(std::move(options)) {}

Checkpoint Checkpoint::open(const fs::path& path, const LoadOptions& options) {
  // "ROOT/step-200/" names the same directory as "ROOT/step-200".
  fs::path root_or_dir = path.has_filename() || !path.has_parent_path() ? path : path.parent_path();
  fs::path dir;
  if (is_complete(root_or_dir)) {
    dir = root_or_dir;
  } else {
    std::error_code ec;
    if (!fs::is_directory(root_or_dir, ec))
      throw IoError(fmt::format("no checkpoint at {}: not a directory", root_or_dir.string()), ENOENT);
    auto entries = list_checkpoints(root_or_dir);
    const CheckpointEntry* best = nullptr;
    std::string incomplete;
    for (const auto& e : entries) {
      if (e.complete) best = &e;
    }
    for (const auto& e : entries)
      if (!e.complete && (!best || e.step > best->step))
        incomplete += fmt::format("{}{}", incomplete.empty() ? "" : ", ", e.dir.filename().string());
    if (!best) {
      if (parse_step_dir_name(root_or_dir.filename().string()))
        throw IoError(fmt::format("{} is an incomplete checkpoint (no {}: its save did not finish)",
                                  root_or_dir.string(), kManifestFile),
                      ENOENT);
      throw IoError(fmt::format("no complete checkpoint under {}{}", root_or_dir.string(),
                                incomplete.empty() ? "" : fmt::format(" (incomplete, ignored: {})", incomplete)),
                    ENOENT);
    }
    if (!incomplete.empty())
      log::warn("checkpoint", "ignoring incomplete {} under {} (no manifest: an interrupted save)", incomplete,
                root_or_dir.string());
    auto latest = read_latest(root_or_dir);
    if (latest && *latest != best->step)
      log::warn("checkpoint", "{}/latest names step-{} but the newest complete checkpoint is step-{}; loading step-{}",
                root_or_dir.string(), *latest, best->step, best->step);
    dir = best->dir;
  }
  fs::path manifest_path = dir / std::string(kManifestFile);
  auto text = read_small_file(manifest_path, options.limits.max_manifest_bytes, false);
  Manifest m = parse_manifest(*text, manifest_path.string(), options.limits);
  // A manifest copied in from another step (with its shards) would load as that step silently.
  if (auto named = parse_step_dir_name(dir.filename().string()); named && *named != m.step)
    throw CorruptError(fmt::format("{}: field step: {}, but the directory is {}", manifest_path.string(), m.step,
                                   dir.filename().string()));
  return Checkpoint(dir, std::move(m), options);
}

void Checkpoint::read_range(ByteRange range, std::span<uint8_t> dest) const {
  if (dest.size() != range.size())
    throw InvalidArgumentError(fmt::format("read_range: destination of {} bytes for a range of {}", dest.size(), range.size()));
  ContiguousSink sink(range, dest);
  read_blocks(dir_, manifest_, range, options_.io_threads, sink);
}

LoadedState Checkpoint::load_range(ByteRange range) const {
  LoadedState st;
  st.manifest = manifest_;
  st.dir = dir_;
  st.range = range;
  st.buffer = HostBuffer(range.size());
  read_range(range, st.buffer.span());
  st.tensors = tensors_in_range(st.manifest, range, st.buffer.data());
  log::debug("checkpoint", "loaded bytes [{}, {}) of {}", range.begin, range.end, dir_.string());
  return st;
}

LoadedState Checkpoint::load(uint32_t rank, uint32_t world_size) const {
  return load_range(partition(manifest_.total_bytes, rank, world_size));
}

void Checkpoint::load_into(std::span<const TensorView> dest) const {
  std::vector<ScatterSink::Target> targets;
  uint64_t lo = UINT64_MAX, hi = 0;
  for (const auto& d : dest) {
    const TensorInfo* t = manifest_.find_tensor(d.name);
    if (!t) throw InvalidArgumentError(fmt::format("checkpoint {}: has no tensor \"{}\"", dir_.string(), d.name));
    if (d.buffer.dtype != t->dtype || d.shape != t->shape)
      throw InvalidArgumentError(fmt::format("checkpoint {}: tensor \"{}\" is {} {}, the destination is {} {}",
                                             dir_.string(), d.name, dtype_name(t->dtype), fmt::join(t->shape, "x"),
                                             dtype_name(d.buffer.dtype), fmt::join(d.shape, "x")));
    if (d.buffer.device != DeviceKind::Cpu || d.buffer.bytes() != t->bytes || (t->bytes > 0 && !d.buffer.data))
      throw InvalidArgumentError(fmt::format("checkpoint load: destination of \"{}\" is not a {}-byte CPU buffer",
                                             d.name, t->bytes));
    if (t->bytes == 0) continue;
    targets.push_back({t->offset, t->bytes, static_cast<uint8_t*>(d.buffer.data)});
    lo = std::min(lo, t->offset);
    hi = std::max(hi, t->offset + t->bytes);
  }
  if (targets.empty()) return;
  ScatterSink sink(std::move(targets));
  read_blocks(dir_, manifest_, {lo, hi}, options_.io_threads, sink);
}

std::vector<ShardCheck> Checkpoint::verify() const {
  const uint64_t B = manifest_.block_bytes;
  std::vector<ShardCheck> checks(manifest_.shards.size());
  std::vector<const ShardInfo*> infos;
  std::vector<uint64_t> blocks;
  std::vector<BlockTask> tasks;
  for (size_t i = 0; i < manifest_.shards.size(); ++i) {
    const ShardInfo& s = manifest_.shards[i];
    checks[i].rank = s.rank;
    checks[i].file = s.file;
    infos.push_back(&s);
    blocks.push_back(0);
    try {
      check_shard(dir_, s);
      checks[i].ok = true;
      blocks.back() = s.block_sha256.size();
      for (uint64_t k = 0; k < s.block_sha256.size(); ++k) tasks.push_back({i, k});
    } catch (const Error& e) {
      checks[i].error = e.what();
    }
  }
  ShardFiles shards(dir_, std::move(infos), blocks);
  std::atomic<size_t> next{0};
  std::mutex m;
  auto work = [&] {
    HostBuffer scratch(std::min<uint64_t>(B, std::max<uint64_t>(manifest_.total_bytes, 1)));
    while (true) {
      size_t i = next++;
      if (i >= tasks.size()) break;
      size_t si = tasks[i].shard;
      bool failed;
      {
        std::lock_guard<std::mutex> lock(m);
        failed = !checks[si].ok;  // one error per shard is enough
      }
      if (!failed) {
        try {
          const std::shared_ptr<const OpenShard> held = shards.acquire(si);
          const OpenShard& s = *held;
          uint64_t k = tasks[i].block;
          size_t size = static_cast<size_t>(std::min(B, s.info->range.size() - k * B));
          read_block(dir_, s, B, k, scratch.data(), size);
        } catch (const Error& e) {
          std::lock_guard<std::mutex> lock(m);
          if (checks[si].ok) {
            checks[si].ok = false;
            checks[si].error = e.what();
          }
        }
      }
      shards.done(si);
    }
  };
  size_t n = std::clamp<size_t>(options_.io_threads, 1, std::max<size_t>(tasks.size(), 1));
  std::vector<std::thread> pool;
  for (size_t i = 1; i < n; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  return checks;
}

LoadedState load(const fs::path& root_or_dir, uint32_t rank, uint32_t world_size, const LoadOptions& options) {
  return Checkpoint::open(root_or_dir, options).load(rank, world_size);
}

}  // namespace meshtrain::checkpoint
