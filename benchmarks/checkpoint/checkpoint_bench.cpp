#include "checkpoint_bench.h"

#include <fcntl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "core/json.h"  // lib/checkpoint: JSON lines
#include "meshtrain/checkpoint.h"

namespace meshtrain::bench {
namespace {

namespace fs = std::filesystem;
namespace ck = meshtrain::checkpoint;
using Clock = std::chrono::steady_clock;

const char* const kUsage = R"(usage: checkpoint_bench [options]

Measures checkpoint save and load throughput against the disk, and the time a training loop
is blocked by CheckpointWriter::save_async() versus a synchronous save(). One JSON object per
line on stdout; progress on stderr.

options:
  --bytes N        state size in bytes (default 1073741824 = 1 GiB), as 16 MiB fp32 tensors
                   plus 32 small fp16 ones
  --dir DIR        where to write (default: a fresh directory under /var/tmp, removed after)
  --repeats N      repetitions of every measurement; medians are reported (default 3)
  --writers LIST   comma-separated writer counts for save/load (default 1,4)
  --help           this text

Records (GBps = 10^9 bytes/s):
  {"op":"disk_write", ...}  sequential 8 MiB writes of the same size, fsync, close (dd-style);
                            one right before every save
  {"op":"disk_read", ...}   sequential 8 MiB reads of that file with the page cache dropped;
                            one right before every load
  {"op":"save","writers":W, ..., "disk_GBps", "ratio_vs_disk"}   W writer threads, one shard
                            each, rank 0 finalizing (manifest, latest), everything fsynced;
                            ratio_vs_disk is the median of (disk time / save time) over the
                            pairs, GBps_best and disk_GBps_best the fastest of each
  {"op":"load","writers":W,"readers":R, ..., "disk_GBps", "ratio_vs_disk"}  the checkpoint of
                            W writers read back with the page cache dropped: R=1 one reader
                            loading everything, R=W readers loading one range each
  {"op":"save_blocking","mode":"sync"|"async"|"async_first", "blocked_s", "ratio_vs_sync"}
                            the time the caller is blocked: a whole save(), or save_async()'s
                            snapshot copy into a reused (async) or fresh (async_first) buffer
)";

struct Options {
  uint64_t bytes = 1ull << 30;
  fs::path dir;
  int repeats = 3;
  std::vector<uint32_t> writers = {1, 4};
};

uint64_t parse_u64(const std::string& flag, const std::string& v) {
  uint64_t out = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || end != v.data() + v.size()) throw InvalidArgumentError(flag + ": not a number: " + v);
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw InvalidArgumentError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--bytes") o.bytes = parse_u64(a, value());
    else if (a == "--dir") o.dir = value();
    else if (a == "--repeats") o.repeats = static_cast<int>(std::max<uint64_t>(1, parse_u64(a, value())));
    else if (a == "--writers") {
      o.writers.clear();
      std::string list = value();
      size_t pos = 0;
      while (pos <= list.size()) {
        size_t comma = list.find(',', pos);
        if (comma == std::string::npos) comma = list.size();
        uint64_t w = parse_u64(a, list.substr(pos, comma - pos));
        if (w == 0 || w > 256) throw InvalidArgumentError("--writers: 1 to 256");
        o.writers.push_back(static_cast<uint32_t>(w));
        pos = comma + 1;
      }
    } else throw InvalidArgumentError("unknown option " + a);
  }
  return o;
}

void fill(std::vector<uint8_t>& v, uint64_t seed) {
  uint64_t s = seed;
  size_t i = 0;
  for (; i + 8 <= v.size(); i += 8) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(v.data() + i, &z, 8);
  }
  for (; i < v.size(); ++i) v[i] = static_cast<uint8_t>(i);
}

struct BenchState {
  std::vector<std::vector<uint8_t>> storage;
  ck::State state;
  uint64_t total_bytes = 0;
};

BenchState make_state(uint64_t bytes) {
  BenchState b;
  const uint64_t big = 16u << 20;
  uint64_t left = bytes;
  int i = 0;
  auto add = [&](const std::string& name, DType dtype, uint64_t nbytes) {
    b.storage.emplace_back(nbytes);
    fill(b.storage.back(), 1000 + b.storage.size());
    BufferView v;
    v.data = b.storage.back().data();
    v.dtype = dtype;
    v.count = nbytes / dtype_size(dtype);
    b.state.tensors.push_back({name, {static_cast<int64_t>(v.count)}, v});
  };
  while (left >= 4) {
    uint64_t n = std::min(big, left) / 4 * 4;
    add(fmt::format("layer{}.weight", i), DType::Float32, n);
    left -= n;
    if (i < 32) add(fmt::format("layer{}.bias", i), DType::Float16, 2002);
    ++i;
  }
  b.state.step = 1;
  b.state.metadata["bench"] = "checkpoint";
  ck::plan_layout(b.state, &b.total_bytes);
  return b;
}

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

void check(bool ok, const std::string& what) {
  if (!ok) throw IoError(what + ": " + std::strerror(errno), errno);
}

// Drops `path`'s pages from the page cache (they are clean after fsync), so reads hit the disk.
void drop_cache(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void drop_tree_cache(const fs::path& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) drop_cache(e.path());
}

// dd-style: sequential 8 MiB writes from memory, fsync, close. Returns seconds.
double disk_write(const fs::path& file, uint64_t bytes, const std::vector<uint8_t>& source) {
  auto t = Clock::now();
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  check(fd >= 0, "open " + file.string());
  const size_t chunk = 8u << 20;
  for (uint64_t off = 0; off < bytes;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, bytes - off));
    ssize_t w = ::write(fd, source.data() + (off % (source.size() - chunk + 1)), n);
    check(w > 0, "write " + file.string());
    off += static_cast<uint64_t>(w);
  }
  check(::fsync(fd) == 0, "fsync");
  check(::close(fd) == 0, "close");
  return since(t);
}

double disk_read(const fs::path& file, std::vector<uint8_t>& buf) {
  drop_cache(file);
  auto t = Clock::now();
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, "open " + file.string());
  while (true) {
    ssize_t r = ::read(fd, buf.data(), 8u << 20);
    check(r >= 0, "read");
    if (r == 0) break;
  }
  ::close(fd);
  return since(t);
}

double save_with(const fs::path& root, const ck::State& state, uint32_t writers, const std::string& id) {
  auto t = Clock::now();
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(writers);
  for (uint32_t r = 0; r < writers; ++r) {
    threads.emplace_back([&, r] {
      try {
        ck::SaveOptions o;
        o.rank = r;
        o.world_size = writers;
        o.save_id = id;
        o.io_threads = writers == 1 ? 2 : 1;  // 2 cores: two threads in all either way
        ck::save(root, state, o);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& th : threads) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return since(t);
}

double load_with(const fs::path& dir, uint32_t readers) {
  drop_tree_cache(dir);
  auto t = Clock::now();
  ck::Checkpoint c = ck::Checkpoint::open(dir);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(readers);
  for (uint32_t r = 0; r < readers; ++r) {
    threads.emplace_back([&, r] {
      try {
        ck::LoadOptions lo;
        lo.io_threads = readers == 1 ? 4 : 1;
        ck::Checkpoint mine = readers == 1 ? c : ck::Checkpoint::open(dir, lo);
        ck::LoadedState s = mine.load(r, readers);
        if (s.range.size() == 0 && c.manifest().total_bytes > readers * 64) throw InternalError("empty load");
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& th : threads) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return since(t);
}

void emit(json::Writer& w) {
  std::string line = w.take();
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

json::Writer record(const char* op) {
  json::Writer w(false);
  w.begin_object().key("bench").value("checkpoint").key("op").value(op);
  return w;
}

void seconds_list(json::Writer& w, const std::vector<double>& v) {
  w.key("seconds").begin_array();
  for (double d : v) w.value(d);
  w.end_array();
}

int run(const Options& o) {
  bool own_dir = o.dir.empty();
  fs::path dir = o.dir;
  if (own_dir) {
    std::string pattern = "/var/tmp/meshtrain-checkpoint-bench-XXXXXX";
    check(::mkdtemp(pattern.data()) != nullptr, "mkdtemp");
    dir = pattern;
  } else {
    fs::create_directories(dir);
  }
  struct Cleanup {
    fs::path dir;
    bool own;
    ~Cleanup() {
      std::error_code ec;
      if (own) fs::remove_all(dir, ec);
    }
  } cleanup{dir, own_dir};

  std::fprintf(stderr, "checkpoint_bench: building a %.2f GiB state in memory\n", o.bytes / double(1 << 30));
  BenchState b = make_state(o.bytes);
  const uint64_t bytes = b.total_bytes;
  std::vector<uint8_t> source(64u << 20);
  fill(source, 7);

  utsname u{};
  ::uname(&u);
  {
    auto w = record("info");
    w.key("bytes").value(bytes).key("tensors").value(uint64_t{b.state.tensors.size()}).key("repeats").value(o.repeats);
    w.key("dir").value(dir.string()).key("host").value(u.nodename).key("kernel").value(u.release);
    w.key("cpus").value(uint64_t{std::thread::hardware_concurrency()}).end_object();
    emit(w);
  }

  // Every save and load is paired with a disk baseline measured right before it, so that a
  // change of load on a shared machine between measurements affects both sides of a ratio.
  struct Pair {
    std::vector<double> op, disk;
  };
  std::map<uint32_t, Pair> save_p, load_1, load_w;
  std::vector<double> all_dw, all_dr;
  fs::path ddfile = dir / "dd.bin";
  auto dd_write = [&] {
    double t = disk_write(ddfile, bytes, source);
    all_dw.push_back(t);
    return t;
  };
  auto dd_read = [&] {
    double t = disk_read(ddfile, source);
    all_dr.push_back(t);
    return t;
  };
  for (int rep = 0; rep < o.repeats; ++rep) {
    std::fprintf(stderr, "checkpoint_bench: repeat %d/%d\n", rep + 1, o.repeats);
    for (uint32_t writers : o.writers) {
      fs::path root = dir / fmt::format("ckpt-{}", writers);
      b.state.step = static_cast<uint64_t>(rep + 1);
      save_p[writers].disk.push_back(dd_write());
      save_p[writers].op.push_back(save_with(root, b.state, writers, fmt::format("bench-{}-{}", writers, rep)));
      fs::path step_dir = root / fmt::format("step-{}", rep + 1);
      load_1[writers].disk.push_back(dd_read());
      load_1[writers].op.push_back(load_with(step_dir, 1));
      if (writers > 1) {
        load_w[writers].disk.push_back(dd_read());
        load_w[writers].op.push_back(load_with(step_dir, writers));
      }
      fs::remove(ddfile);
      fs::remove_all(root);
    }
  }
  auto gbps = [&](double s) { return bytes / s / 1e9; };
  {
    double dw = median(all_dw), dr = median(all_dr);
    auto w = record("disk_write");
    w.key("writers").value(1).key("bytes").value(bytes).key("seconds_median").value(dw);
    seconds_list(w, all_dw);
    w.key("GBps").value(gbps(dw)).end_object();
    emit(w);
    auto r = record("disk_read");
    r.key("readers").value(1).key("bytes").value(bytes).key("seconds_median").value(dr);
    seconds_list(r, all_dr);
    r.key("GBps").value(gbps(dr)).end_object();
    emit(r);
  }
  // GBps and disk_GBps: medians; ratio_vs_disk: the median of the paired ratios (disk time /
  // operation time); *_best: from the fastest of each.
  auto emit_pair = [&](const char* op, uint32_t writers, uint32_t readers, const Pair& p) {
    std::vector<double> ratios;
    for (size_t i = 0; i < p.op.size(); ++i) ratios.push_back(p.disk[i] / p.op[i]);
    double t = median(p.op), d = median(p.disk);
    double best = *std::min_element(p.op.begin(), p.op.end());
    double disk_best = *std::min_element(p.disk.begin(), p.disk.end());
    auto w = record(op);
    w.key("writers").value(writers);
    if (readers) w.key("readers").value(readers);
    w.key("bytes").value(bytes).key("seconds_median").value(t);
    seconds_list(w, p.op);
    w.key("disk_seconds").begin_array();
    for (double x : p.disk) w.value(x);
    w.end_array();
    w.key("GBps").value(gbps(t)).key("disk_GBps").value(gbps(d)).key("ratio_vs_disk").value(median(ratios));
    w.key("GBps_best").value(gbps(best)).key("disk_GBps_best").value(gbps(disk_best)).end_object();
    emit(w);
  };
  for (uint32_t writers : o.writers) {
    emit_pair("save", writers, 0, save_p[writers]);
    emit_pair("load", writers, 1, load_1[writers]);
    if (writers > 1) emit_pair("load", writers, writers, load_w[writers]);
  }

  // Blocked time: a synchronous save blocks for all of it; save_async() for the snapshot copy.
  std::fprintf(stderr, "checkpoint_bench: blocked time, sync vs async\n");
  std::vector<double> sync_s, async_s, async_total;
  double async_first = 0;
  {
    fs::path root = dir / "blocking";
    ck::SaveOptions so;
    so.keep_last = 1;
    ck::CheckpointWriter writer(root, so);
    uint64_t step = 100;
    // First save into a fresh staging buffer (pays the page faults), as a cold start would.
    b.state.step = step++;
    auto t = Clock::now();
    writer.save_async(b.state);
    async_first = since(t);
    writer.wait();
    for (int rep = 0; rep < o.repeats; ++rep) {
      b.state.step = step++;
      t = Clock::now();
      ck::save(root, b.state, so);
      sync_s.push_back(since(t));
      b.state.step = step++;
      t = Clock::now();
      writer.save_async(b.state);
      async_s.push_back(since(t));
      // The training loop would run here; the next save (or wait()) waits for this one.
      writer.wait();
      async_total.push_back(since(t));
    }
    fs::remove_all(root);
  }
  double sync_m = median(sync_s);
  {
    auto w = record("save_blocking");
    w.key("mode").value("sync").key("writers").value(1).key("bytes").value(bytes).key("blocked_s").value(sync_m);
    seconds_list(w, sync_s);
    w.key("ratio_vs_sync").value(1.0).end_object();
    emit(w);
    double a = median(async_s);
    auto x = record("save_blocking");
    x.key("mode").value("async").key("writers").value(1).key("bytes").value(bytes).key("blocked_s").value(a);
    seconds_list(x, async_s);
    x.key("write_s").value(median(async_total)).key("ratio_vs_sync").value(a / sync_m).end_object();
    emit(x);
    auto f = record("save_blocking");
    f.key("mode").value("async_first").key("writers").value(1).key("bytes").value(bytes).key("blocked_s").value(async_first);
    f.key("ratio_vs_sync").value(async_first / sync_m).end_object();
    emit(f);
  }
  return 0;
}

}  // namespace

int checkpoint_bench_main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  try {
    return run(parse(argc, argv));
  } catch (const InvalidArgumentError& e) {
    std::fprintf(stderr, "checkpoint_bench: %s\n\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint_bench: %s\n", e.what());
    return 1;
  }
}

}  // namespace meshtrain::bench
