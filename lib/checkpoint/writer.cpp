// CheckpointWriter: snapshot into a reused host staging buffer, write in a background thread.
#include <cstring>
#include <mutex>
#include <thread>

#include "checkpoint/internal.h"

namespace meshtrain::checkpoint {

using namespace detail;

struct CheckpointWriter::Impl {
  fs::path root;
  SaveOptions options;

  std::thread worker;
  mutable std::mutex m;
  bool done = true;               // the worker (if any) has finished
  std::exception_ptr error;       // the last save's failure, not yet reported
  std::optional<SaveResult> result;

  // The snapshot the worker writes from. Touched by the caller only while no worker runs.
  HostBuffer staging;
  Layout layout;
  ByteRange range;
  uint64_t step = 0;
  std::string save_id;
  std::map<std::string, std::string> metadata;
  std::map<std::string, std::vector<uint8_t>> blobs;

  void join() {
    if (worker.joinable()) worker.join();
  }

  // Copies the range's bytes of `state` into staging, split over io_threads threads.
  void copy(const State& state) {
    StateSource source(layout, state);
    uint32_t threads = std::max<uint32_t>(1, options.io_threads);
    if (range.size() < (8u << 20)) threads = 1;
    auto part = [&](uint32_t i) {
      // Cut points on 64-byte boundaries, as partition() does.
      auto cut = [&](uint32_t j) {
        if (j == threads) return range.end;
        uint64_t v = range.begin + range.size() / threads * j;
        return v / kAlignmentBytes * kAlignmentBytes < range.begin ? range.begin : v / kAlignmentBytes * kAlignmentBytes;
      };
      ByteRange r{cut(i), cut(i + 1)};
      if (r.begin >= r.end) return;
      std::vector<Segment> segments;
      source.segments(r, segments);
      for (const auto& s : segments) {
        uint8_t* dst = staging.data() + (s.offset - range.begin);
        if (s.data) {
          std::memcpy(dst, s.data, s.length);
        } else {
          std::memset(dst, 0, s.length);
        }
      }
    };
    std::vector<std::thread> helpers;
    for (uint32_t i = 1; i < threads; ++i) helpers.emplace_back(part, i);
    part(0);
    for (auto& t : helpers) t.join();
  }

  void run() {
    try {
      BufferSource source(range.begin, staging.data(), range.size());
      SaveJob job{step, save_id, &layout, &metadata, &blobs, &source};
      SaveResult r = run_save(root, job, options);
      std::lock_guard<std::mutex> lock(m);
      result = std::move(r);
      done = true;
    } catch (const std::exception& e) {
      log::error("checkpoint", "background save of {} failed (reported by the next save_async() or wait()): {}",
                 step_dir_name(step), e.what());
      std::lock_guard<std::mutex> lock(m);
      error = std::current_exception();
      done = true;
    }
  }
};

CheckpointWriter::CheckpointWriter(fs::path root, SaveOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->root = std::move(root);
  impl_->options = std::move(options);
  if (impl_->options.world_size == 0 || impl_->options.rank >= impl_->options.world_size)
    throw InvalidArgumentError(fmt::format("CheckpointWriter: rank {} of world size {}", impl_->options.rank,
                                           impl_->options.world_size));
  check_block_bytes(impl_->options.block_bytes);
}

CheckpointWriter::~CheckpointWriter() {
  impl_->join();
  if (impl_->error) {
    try {
      std::rethrow_exception(impl_->error);
    } catch (const std::exception& e) {
      log::error("checkpoint", "CheckpointWriter destroyed with an unreported failed save: {}", e.what());
    }
  }
}

void CheckpointWriter::save_async(const State& state, std::string save_id) {
  Impl& d = *impl_;
  std::string id = resolve_save_id(d.options, std::move(save_id));
  d.join();
  if (d.error) {
    std::exception_ptr e = d.error;
    d.error = nullptr;
    d.result.reset();
    std::rethrow_exception(e);
  }
  d.result.reset();
  // Validate before touching the staging buffer: a bad state leaves the writer as it was.
  Layout layout = layout_for_save(state, d.options);
  ByteRange range = partition(layout.total_bytes, d.options.rank, d.options.world_size);
  if (d.staging.size() < range.size()) {
    d.staging = HostBuffer();  // free the old one first: never hold two
    d.staging = HostBuffer(range.size());
  }
  d.layout = std::move(layout);
  d.range = range;
  d.step = state.step;
  d.save_id = std::move(id);
  d.metadata = state.metadata;
  d.blobs = state.blobs;
  d.copy(state);
  {
    std::lock_guard<std::mutex> lock(d.m);
    d.done = false;
  }
  d.worker = std::thread([&d] { d.run(); });
}

std::optional<SaveResult> CheckpointWriter::wait() {
  Impl& d = *impl_;
  d.join();
  if (d.error) {
    std::exception_ptr e = d.error;
    d.error = nullptr;
    std::rethrow_exception(e);
  }
  std::optional<SaveResult> r = std::move(d.result);
  d.result.reset();
  return r;
}

bool CheckpointWriter::busy() const {
  std::lock_guard<std::mutex> lock(impl_->m);
  return !impl_->done;
}

void CheckpointWriter::reserve(uint64_t bytes) {
  Impl& d = *impl_;
  d.join();
  if (d.staging.size() >= bytes) return;
  d.staging = HostBuffer();
  d.staging = HostBuffer(bytes);
  std::memset(d.staging.data(), 0, bytes);
}

}  // namespace meshtrain::checkpoint
