// Saving: one writer's shard (parallel blocks: hash + pwritev), rank 0's finalize (sidecars ->
// manifest -> latest), listing and pruning.
#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include "checkpoint/internal.h"
#include "core/json.h"

namespace meshtrain::checkpoint {

namespace detail {

namespace {

constexpr size_t kLatestMaxBytes = 4096;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double gbps(uint64_t bytes, double seconds) { return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0; }

// Zero bytes for the padding between tensors (always shorter than kAlignmentBytes, but any
// length works: long runs are written from this buffer repeatedly).
const uint8_t kZeros[4096] = {};

// Appends `s` to the block's iovecs and hash.
void add_segment(const Segment& s, std::vector<iovec>& iov, crypto::Sha256& hash) {
  if (s.data) {
    iov.push_back({const_cast<uint8_t*>(s.data), static_cast<size_t>(s.length)});
    hash.update({s.data, static_cast<size_t>(s.length)});
    return;
  }
  for (uint64_t left = s.length; left > 0;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(left, sizeof kZeros));
    iov.push_back({const_cast<uint8_t*>(kZeros), n});
    hash.update({kZeros, n});
    left -= n;
  }
}

// Copies the block's segments (zeros for padding) into `out` and hashes them from there.
void gather_segment(const Segment& s, uint8_t* out, crypto::Sha256& hash) {
  if (s.data)
    std::memcpy(out, s.data, static_cast<size_t>(s.length));
  else
    std::memset(out, 0, static_cast<size_t>(s.length));
  hash.update({out, static_cast<size_t>(s.length)});
}

// Runs `work(thread_index)` on `threads` threads (the caller's included) while the caller also
// logs progress every `interval`: progress() returns the line to log. Rethrows the first error.
template <typename Work, typename Progress>
void run_workers(uint32_t threads, Work work, std::chrono::milliseconds interval, Progress progress,
                 std::atomic<bool>& stop) {
  std::mutex m;
  std::condition_variable cv;
  std::exception_ptr error;
  uint32_t running = threads;
  auto body = [&](uint32_t i) {
    try {
      work(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(m);
      if (!error) error = std::current_exception();
      stop = true;
    }
    std::lock_guard<std::mutex> lock(m);
    --running;
    cv.notify_all();
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  try {
    for (uint32_t i = 0; i < threads; ++i) pool.emplace_back(body, i);
  } catch (...) {
    stop = true;
    {
      std::lock_guard<std::mutex> lock(m);
      running -= threads - static_cast<uint32_t>(pool.size());
    }
    for (auto& t : pool) t.join();
    throw;
  }
  {
    std::unique_lock<std::mutex> lock(m);
    while (running > 0) {
      if (!cv.wait_for(lock, interval, [&] { return running == 0; })) {
        lock.unlock();
        progress();
        lock.lock();
      }
    }
  }
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

void unlink_if_present(const fs::path& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw_io_error(fmt::format("cannot remove {}", path.string()), errno);
}

ShardRecord write_shard(const fs::path& dir, const SaveJob& job, const SaveOptions& o) {
  const uint64_t block = o.block_bytes;
  const ByteRange range = partition(job.layout->total_bytes, o.rank, o.world_size);
  const std::string file = shard_file_name(o.rank, o.world_size);
  const fs::path path = dir / file;
  const std::string where = fmt::format("checkpoint {} shard {}", step_dir_name(job.step), file);
  const auto start = Clock::now();

  // A sidecar left by an earlier attempt must not outlive the shard it described.
  unlink_if_present(dir / sidecar_file_name(o.rank, o.world_size));
  File f = open_file(path, O_WRONLY | O_CREAT | O_TRUNC, "shard file");
  if (range.size() > 0) {
    // Reserve the space first, so that a full disk fails now rather than after writing most of
    // the shard. Filesystems without fallocate are fine: the writes report ENOSPC then.
    int rc = ::posix_fallocate(f.get(), 0, static_cast<off_t>(range.size()));
    if (rc == ENOSPC || rc == EFBIG || rc == EDQUOT)
      throw_io_error(fmt::format("reserving {} for shard file {}", format_bytes(range.size()), path.string()), rc);
  }

  const uint64_t nblocks = (range.size() + block - 1) / block;
  std::vector<crypto::Digest> digests(nblocks);
  std::atomic<uint64_t> next{0}, blocks_done{0}, bytes_done{0};
  std::atomic<bool> stop{false};
  const int fd = f.get();
  // Whole 4 KiB-aligned blocks go to the disk with O_DIRECT from a bounce buffer per thread, so
  // the disk writes while other blocks are hashed. Through the page cache they all reached the
  // disk only at the final fsync (a 1 GiB shard stays below the kernel's background writeback
  // threshold), after the hashing: a save took about the dd baseline plus the hashing. The
  // tail block, and filesystems without O_DIRECT (tmpfs), go through the page cache.
  File direct;
  if (block % kDirectAlignment == 0) {
    int dfd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC | O_DIRECT);
    if (dfd >= 0) direct = File(dfd);
  }
  std::atomic<bool> use_direct{static_cast<bool>(direct)};
  auto work = [&](uint32_t) {
    std::vector<Segment> segments;
    std::vector<iovec> iov;
    std::unique_ptr<uint8_t, decltype(&std::free)> bounce(nullptr, &std::free);
    while (!stop) {
      uint64_t k = next++;
      if (k >= nblocks) break;
      if (o.cancel) o.cancel->throw_if_cancelled(where);
      ByteRange b{range.begin + k * block, std::min(range.begin + (k + 1) * block, range.end)};
      job.source->segments(b, segments);
      crypto::Sha256 hash;
      const uint64_t offset = b.begin - range.begin;
      if (use_direct && b.size() % kDirectAlignment == 0) {
        if (!bounce) {
          bounce.reset(static_cast<uint8_t*>(std::aligned_alloc(kDirectAlignment, block)));  // block: 4 KiB multiple
          if (!bounce) throw std::bad_alloc();
        }
        uint8_t* p = bounce.get();
        for (const auto& s : segments) {
          gather_segment(s, p, hash);
          p += s.length;
        }
        digests[k] = hash.finish();
        try {
          pwrite_all(direct.get(), bounce.get(), b.size(), offset, path);
        } catch (const IoError& e) {
          if (e.errno_value() != EINVAL) throw;
          use_direct = false;  // a stricter O_DIRECT alignment: this block and the rest through the page cache
          pwrite_all(fd, bounce.get(), b.size(), offset, path);
        }
      } else {
        iov.clear();
        for (const auto& s : segments) add_segment(s, iov, hash);
        digests[k] = hash.finish();
        pwritev_all(fd, iov, offset, path);
      }
      bytes_done += b.size();
      uint64_t done = ++blocks_done;
      if (o.after_block) o.after_block(done, nblocks);
    }
  };
  uint32_t threads = static_cast<uint32_t>(std::clamp<uint64_t>(o.io_threads, 1, std::max<uint64_t>(nblocks, 1)));
  auto progress = [&] {
    double s = seconds_since(start);
    log::info("checkpoint", "{}: {} of {} written ({:.2f} GB/s)", where, format_bytes(bytes_done), format_bytes(range.size()),
              gbps(bytes_done, s));
  };
  run_workers(threads, work, o.progress_interval, progress, stop);
  fsync_fd(fd, path);  // also flushes the disk's cache for the O_DIRECT writes
  if (direct) direct.close(path.string());
  f.close(path.string());

  ShardRecord record;
  record.save_id = job.save_id;
  record.step = job.step;
  record.world_size = o.world_size;
  record.block_bytes = block;
  record.layout_sha256 = layout_digest(job.layout->tensors, job.layout->total_bytes, block);
  record.shard.rank = o.rank;
  record.shard.file = file;
  record.shard.range = range;
  record.shard.block_sha256 = std::move(digests);
  record.shard.sha256 = digest_of_blocks(record.shard.block_sha256);
  write_file_atomic(dir, sidecar_file_name(o.rank, o.world_size), shard_record_to_json(record));
  double s = seconds_since(start);
  log::debug("checkpoint", "{}: wrote {} in {:.2f} s ({:.2f} GB/s)", where, format_bytes(range.size()), s,
            gbps(range.size(), s));
  return record;
}

// Checks writer `rank`'s record against rank 0's view of the save.
void check_record(const ShardRecord& r, uint32_t rank, const SaveJob& job, const SaveOptions& o,
                  const crypto::Digest& layout, std::string_view source) {
  auto bad = [&](std::string_view what) {
    throw CorruptError(fmt::format("checkpoint {}: {} (writer {}) {}", step_dir_name(job.step), source, rank, what));
  };
  if (r.step != job.step) bad(fmt::format("is for step {}", r.step));
  if (r.world_size != o.world_size) bad(fmt::format("has world size {}, expected {}", r.world_size, o.world_size));
  if (r.shard.rank != rank) bad(fmt::format("is for rank {}", r.shard.rank));
  if (r.block_bytes != o.block_bytes) bad(fmt::format("uses blocks of {} bytes, rank 0 uses {}", r.block_bytes, o.block_bytes));
  if (r.layout_sha256 != layout)
    bad("saved a different tensor table (names, dtypes, shapes) than rank 0: every writer must pass the same tensors");
  ByteRange expected = partition(job.layout->total_bytes, rank, o.world_size);
  if (r.shard.range != expected)
    bad(fmt::format("covers bytes [{}, {}), expected [{}, {})", r.shard.range.begin, r.shard.range.end, expected.begin,
                    expected.end));
}

// Sleeps up to `ms`, waking early when `cancel` fires.
void nap(std::chrono::milliseconds ms, const CancelToken* cancel) {
  if (!cancel) {
    std::this_thread::sleep_for(ms);
    return;
  }
  pollfd p{cancel->fd(), POLLIN, 0};
  ::poll(&p, 1, static_cast<int>(ms.count()));
}

}  // namespace

std::optional<uint64_t> read_latest(const fs::path& root) {
  std::optional<std::string> text;
  try {
    text = read_small_file(root / std::string(kLatestFile), kLatestMaxBytes, true);
  } catch (const Error& e) {
    log::warn("checkpoint", "ignoring {}: {}", (root / std::string(kLatestFile)).string(), e.what());
    return std::nullopt;
  }
  if (!text) return std::nullopt;
  std::string_view t = *text;
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' ')) t.remove_suffix(1);
  auto step = parse_step_dir_name(t);
  if (!step) log::warn("checkpoint", "ignoring {}: \"{}\" is not a step-<N> name", (root / "latest").string(), t);
  return step;
}

bool is_complete(const fs::path& dir) {
  struct stat st {};
  return ::stat((dir / std::string(kManifestFile)).c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string resolve_save_id(const SaveOptions& o, std::string save_id) {
  if (o.world_size == 0 || o.rank >= o.world_size)
    throw InvalidArgumentError(fmt::format("checkpoint save: rank {} of world size {}", o.rank, o.world_size));
  check_block_bytes(o.block_bytes);
  if (save_id.empty()) save_id = o.save_id;
  if (save_id.empty()) {
    if (o.world_size > 1)
      throw InvalidArgumentError(
          "checkpoint save: SaveOptions::save_id is required when world_size > 1 (the same string on every writer "
          "of one save, a new one for every attempt)");
    uint8_t r[8];
    crypto::random_bytes(r);
    save_id = crypto::to_hex(r);
  }
  if (save_id.size() > 256 || !json::valid_utf8(save_id))
    throw InvalidArgumentError("checkpoint save: save_id must be at most 256 bytes of UTF-8");
  return save_id;
}

SaveResult run_save(const fs::path& root, const SaveJob& job, const SaveOptions& o) {
  const auto start = Clock::now();
  make_dirs(root);
  const fs::path dir = root / step_dir_name(job.step);
  if (is_complete(dir))
    throw InvalidArgumentError(fmt::format("checkpoint {} already exists and is complete; refusing to overwrite it",
                                           dir.string()));
  make_dirs(dir);
  SaveResult result;
  result.dir = dir;
  result.step = job.step;
  result.record = write_shard(dir, job, o);
  if (o.rank == 0 && o.finalize) {
    run_finalize(root, job, o, {&result.record, 1});
    result.finalized = true;
  }
  result.seconds = seconds_since(start);
  return result;
}

Manifest run_finalize(const fs::path& root, const SaveJob& job, const SaveOptions& o,
                      std::span<const ShardRecord> records) {
  const fs::path dir = root / step_dir_name(job.step);
  const std::string name = step_dir_name(job.step);
  const uint32_t world = o.world_size;
  const crypto::Digest layout = layout_digest(job.layout->tensors, job.layout->total_bytes, o.block_bytes);
  ManifestLimits limits;

  std::vector<std::optional<ShardRecord>> have(world);
  for (const auto& r : records) {
    if (r.shard.rank >= world)
      throw InvalidArgumentError(fmt::format("checkpoint {}: a shard record has rank {} of world size {}", name,
                                             r.shard.rank, world));
    if (r.save_id != job.save_id)
      throw InvalidArgumentError(fmt::format("checkpoint {}: the record of writer {} is from save \"{}\", not \"{}\"",
                                             name, r.shard.rank, r.save_id, job.save_id));
    check_record(r, r.shard.rank, job, o, layout, fmt::format("the record of writer {}", r.shard.rank));
    have[r.shard.rank] = r;
  }

  // The other writers' sidecars, on a filesystem the writers share. A sidecar of another save
  // attempt (a crashed earlier run of the same step) is not ours: keep waiting for ours.
  const Deadline deadline = Deadline::after(o.finalize_timeout);
  auto pause = std::chrono::milliseconds(5);
  std::vector<bool> stale_logged(world, false);
  while (true) {
    std::vector<uint32_t> missing;
    for (uint32_t r = 0; r < world; ++r) {
      if (have[r]) continue;
      std::string sidecar = sidecar_file_name(r, world);
      fs::path path = dir / sidecar;
      auto text = read_small_file(path, limits.max_manifest_bytes, true);
      if (text) {
        ShardRecord rec = parse_shard_record(*text, path.string(), limits);
        if (rec.save_id == job.save_id) {
          check_record(rec, r, job, o, layout, sidecar);
          have[r] = std::move(rec);
          continue;
        }
        if (!stale_logged[r]) {
          log::debug("checkpoint", "{}: {} is from save \"{}\", waiting for save \"{}\"", name, sidecar, rec.save_id,
                     job.save_id);
          stale_logged[r] = true;
        }
      }
      missing.push_back(r);
    }
    if (missing.empty()) break;
    if (o.cancel) o.cancel->throw_if_cancelled(fmt::format("checkpoint {}: waiting for the other writers", name));
    if (deadline.expired()) {
      std::string files;
      for (uint32_t r : missing) files += fmt::format("{}{}", files.empty() ? "" : ", ", shard_file_name(r, world));
      throw TimeoutError(fmt::format(
          "checkpoint {}: after {} ms, {} of {} writers have not finished (missing {} and their sidecars in {}); "
          "the checkpoint is incomplete and will be ignored",
          name, o.finalize_timeout.count(), missing.size(), world, files, dir.string()));
    }
    nap(std::min<std::chrono::milliseconds>(pause, std::chrono::milliseconds(std::max(deadline.remaining_ms(), 1))),
        o.cancel);
    pause = std::min<std::chrono::milliseconds>(pause * 2, std::chrono::milliseconds(100));
  }

  // Sizes only: re-hashing every shard here would make rank 0 read the whole state.
  for (uint32_t r = 0; r < world; ++r) {
    fs::path path = dir / have[r]->shard.file;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT)
        throw CorruptError(fmt::format("checkpoint {}: shard file {} of writer {} is missing", name, have[r]->shard.file, r));
      throw_io_error(fmt::format("stat {}", path.string()), errno);
    }
    if (static_cast<uint64_t>(st.st_size) != have[r]->shard.range.size())
      throw CorruptError(fmt::format("checkpoint {}: shard file {} has {} bytes, its writer reported {}", name,
                                     have[r]->shard.file, st.st_size, have[r]->shard.range.size()));
  }

  Manifest m;
  m.step = job.step;
  m.save_id = job.save_id;
  m.world_size = world;
  m.total_bytes = job.layout->total_bytes;
  m.block_bytes = o.block_bytes;
  m.created_unix_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  m.tensors = job.layout->tensors;
  for (uint32_t r = 0; r < world; ++r) m.shards.push_back(have[r]->shard);
  m.metadata = *job.metadata;
  m.blobs = *job.blobs;
  // What readers will parse: a manifest they refuse would be a published checkpoint nobody can
  // open (and `latest` and pruning would follow it), so it is refused here, before the commit.
  const std::string json = manifest_to_json(m);
  try {
    (void)parse_manifest(json, name, ManifestLimits{});
  } catch (const CorruptError& e) {
    throw InvalidArgumentError(fmt::format("checkpoint {}: not committed, readers would refuse its manifest: {}", name,
                                           e.what()));
  }
  // The commit point: once manifest.json is in place (renamed, directory fsynced) the checkpoint
  // is complete.
  write_file_atomic(dir, kManifestFile, json);
  fsync_dir(root);  // the step directory's own entry
  log::info("checkpoint", "{}: complete ({} writer{}, {}) in {}", name, world, world == 1 ? "" : "s",
            format_bytes(m.total_bytes), dir.string());

  auto latest = read_latest(root);
  if (latest && *latest > job.step && is_complete(root / step_dir_name(*latest))) {
    log::info("checkpoint", "{}: `latest` keeps naming the newer {}", name, step_dir_name(*latest));
  } else {
    write_file_atomic(root, kLatestFile, name + "\n");
  }

  // Pruning failures do not undo a complete save: they are logged, and the next prune retries.
  try {
    prune(root, o.keep_last, job.step);
  } catch (const Error& e) {
    log::warn("checkpoint", "pruning {} after {} failed: {}", root.string(), name, e.what());
  }
  return m;
}

std::vector<crypto::Digest> hash_blocks(const ByteSource& source, ByteRange range, uint64_t block, uint32_t threads) {
  const uint64_t nblocks = (range.size() + block - 1) / block;
  std::vector<crypto::Digest> digests(nblocks);
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  auto work = [&](uint32_t) {
    std::vector<Segment> segments;
    std::vector<iovec> iov;
    while (!stop) {
      uint64_t k = next++;
      if (k >= nblocks) break;
      ByteRange b{range.begin + k * block, std::min(range.begin + (k + 1) * block, range.end)};
      source.segments(b, segments);
      crypto::Sha256 hash;
      iov.clear();
      for (const auto& s : segments) add_segment(s, iov, hash);
      digests[k] = hash.finish();
    }
  };
  uint32_t n = static_cast<uint32_t>(std::clamp<uint64_t>(threads, 1, std::max<uint64_t>(nblocks, 1)));
  run_workers(n, work, std::chrono::hours(1), [] {}, stop);
  return digests;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------

using namespace detail;

SaveResult save(const fs::path& root, const State& state, const SaveOptions& options) {
  std::string save_id = resolve_save_id(options, {});
  Layout layout = layout_for_save(state, options);
  StateSource source(layout, state);
  SaveJob job{state.step, save_id, &layout, &state.metadata, &state.blobs, &source};
  return run_save(root, job, options);
}

Manifest finalize(const fs::path& root, const State& state, const SaveOptions& options,
                  std::span<const ShardRecord> records) {
  SaveOptions o = options;
  if (o.save_id.empty() && !records.empty()) o.save_id = records.front().save_id;
  std::string save_id = resolve_save_id(o, {});
  Layout layout = layout_for_save(state, o);
  SaveJob job{state.step, save_id, &layout, &state.metadata, &state.blobs, nullptr};
  return run_finalize(root, job, o, records);
}

std::vector<CheckpointEntry> list_checkpoints(const fs::path& root) {
  std::vector<CheckpointEntry> out;
  std::error_code ec;
  fs::directory_iterator it(root, ec);
  if (ec) {
    if (ec == std::errc::no_such_file_or_directory) return out;
    throw IoError(fmt::format("cannot list checkpoints in {}: {}", root.string(), ec.message()), ec.value());
  }
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) throw IoError(fmt::format("cannot list checkpoints in {}: {}", root.string(), ec.message()), ec.value());
    auto step = parse_step_dir_name(it->path().filename().string());
    if (!step) continue;
    std::error_code dir_ec;
    if (!it->is_directory(dir_ec)) continue;
    out.push_back({*step, it->path(), is_complete(it->path())});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  return out;
}

std::vector<fs::path> prune(const fs::path& root, uint32_t keep_last, std::optional<uint64_t> committed) {
  std::vector<fs::path> removed;
  auto entries = list_checkpoints(root);
  std::optional<uint64_t> latest = read_latest(root);
  // Incomplete directories below this step are leftovers of interrupted saves.
  std::optional<uint64_t> incomplete_below;
  for (const auto& e : entries)
    if (e.complete) incomplete_below = e.step;
  if (committed && incomplete_below && *committed < *incomplete_below) incomplete_below = committed;
  uint32_t kept = 0;
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {
    if (!it->complete) continue;
    bool keep = keep_last == 0 || kept < keep_last || (latest && *latest == it->step) ||
                (committed && *committed == it->step);
    if (keep) {
      ++kept;
      continue;
    }
    // Incomplete first (atomically), then gone: a crash in between leaves an incomplete
    // directory, which is ignored and removed later.
    unlink_if_present(it->dir / std::string(kManifestFile));
    fsync_dir(it->dir);
    remove_tree(it->dir);
    removed.push_back(it->dir);
    log::info("checkpoint", "pruned {}", it->dir.string());
  }
  for (const auto& e : entries) {
    if (e.complete || !incomplete_below || e.step >= *incomplete_below) continue;
    remove_tree(e.dir);
    removed.push_back(e.dir);
    log::info("checkpoint", "removed incomplete {}", e.dir.string());
  }
  if (!removed.empty()) fsync_dir(root);
  std::error_code ec;
  for (fs::directory_iterator it(root, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string n = it->path().filename().string();
    if (n == std::string(kLatestFile) + ".tmp") unlink_if_present(it->path());
  }
  return removed;
}

}  // namespace meshtrain::checkpoint
