// meshtrain checkpoint: sharded, hash-verified, asynchronous checkpoints that reload on any
// number of peers, and the same format streamed live to a joining peer.
//
// A training state is a list of named tensors (plain CPU buffers: name, dtype, shape, bytes),
// the step, user metadata (string map) and small opaque blobs (RNG state, data cursor, ...).
// Torch glue (not in this header) turns a torch::nn::Module / Optimizer into a State and back;
// nothing here includes torch.
//
// On disk (docs/checkpoints.md is the format specification):
//
//   ROOT/
//     latest                     "step-200\n": the highest-step complete checkpoint
//     step-200/
//       shard-0-of-4.bin ...     writer r's byte range of the state, raw
//       shard-0-of-4.json ...    writer r's sidecar: its range, size and SHA-256s
//       manifest.json            written last, by rank 0: the checkpoint is complete iff present
//
// The tensors' bytes are laid out one after the other (each at a 64-byte aligned offset, zero
// padding between them) into one global byte stream, cut into `world_size` balanced ranges; the
// writer of rank r writes only range r. Each shard is hashed in blocks (SHA-256 per block_bytes
// block, and a shard digest over the block digests), so a reader that needs part of a shard
// reads and verifies only the blocks it needs. Nothing is trusted before its hash is checked.
//
// Crash safety: shards and sidecars are fsynced before the manifest is written to a temporary
// name, fsynced, renamed and the directory fsynced; then `latest` is replaced the same way. A
// crash at any point leaves the previous complete checkpoint loadable; directories without a
// manifest are ignored by load and removed by the next save (or prune()).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

namespace meshtrain::net {
class BulkChannel;
}

namespace meshtrain::checkpoint {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint64_t kAlignmentBytes = 64;           // tensor offsets and range cuts
inline constexpr uint64_t kDefaultBlockBytes = 16u << 20;  // hash block size
inline constexpr std::string_view kManifestFile = "manifest.json";
inline constexpr std::string_view kLatestFile = "latest";

// ---------------------------------------------------------------------------------------------
// The state to save. Tensors are borrowed: save() reads them during the call only;
// CheckpointWriter::save_async() copies them before it returns.

struct TensorView {
  std::string name;            // unique, 1..1024 bytes of UTF-8 without control characters
  std::vector<int64_t> shape;  // [] is a scalar (one element); a 0 dimension is an empty tensor
  BufferView buffer;           // CPU memory; buffer.count must equal the product of shape
};

struct State {
  uint64_t step = 0;
  std::vector<TensorView> tensors;
  std::map<std::string, std::string> metadata;          // UTF-8 values; stored in the manifest
  // Small opaque byte blobs (RNG states, data cursor, ...), stored base64 in the manifest; at
  // most ManifestLimits::max_blob_bytes together. Large per-parameter state (a codec's
  // error-feedback residuals, optimizer moments) belongs in `tensors`, where it is sharded.
  std::map<std::string, std::vector<uint8_t>> blobs;
};

// An uninitialized, owned host buffer, 64-byte aligned (2 MiB aligned and backed by transparent
// huge pages where available when 4 MiB or larger, so that first touching it is cheap). The
// seam for pinned (page-locked) memory once the CUDA glue exists: the same type, another
// allocator.
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t bytes);
  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::span<uint8_t> span() { return {data_.get(), size_}; }
  std::span<const uint8_t> span() const { return {data_.get(), size_}; }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t[], Free> data_;
  size_t size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Layout and manifest.

// A half-open range [begin, end) of the global byte stream.
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  uint64_t size() const { return end - begin; }
  bool operator==(const ByteRange&) const = default;
};

// The range of rank `rank` of `world_size` over `total_bytes`: cuts at multiples of
// kAlignmentBytes, sizes within 64 bytes of each other. Used for writers and readers alike.
ByteRange partition(uint64_t total_bytes, uint32_t rank, uint32_t world_size);

struct TensorInfo {
  std::string name;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // in the global byte stream, a multiple of kAlignmentBytes
  uint64_t bytes = 0;   // elements x dtype size
  bool operator==(const TensorInfo&) const = default;
};

struct ShardInfo {
  uint32_t rank = 0;
  std::string file;                          // "shard-<rank>-of-<world>.bin", in the directory
  ByteRange range;                           // the global bytes it holds; file size = range.size()
  crypto::Digest sha256{};                   // SHA-256 of the concatenated block digests
  std::vector<crypto::Digest> block_sha256;  // SHA-256 of each block_bytes block of the file
};

struct Manifest {
  uint32_t format_version = kFormatVersion;
  uint64_t step = 0;
  std::string save_id;  // identifies the save attempt (see SaveOptions::save_id)
  uint32_t world_size = 1;
  uint64_t total_bytes = 0;
  uint64_t block_bytes = kDefaultBlockBytes;
  int64_t created_unix_ms = 0;
  std::vector<TensorInfo> tensors;  // in save order, offsets increasing
  std::vector<ShardInfo> shards;    // one per writer, in rank order, ranges contiguous
  std::map<std::string, std::string> metadata;
  std::map<std::string, std::vector<uint8_t>> blobs;

  const TensorInfo* find_tensor(std::string_view name) const;
};

// Bounds applied before anything from a manifest is allocated or trusted.
struct ManifestLimits {
  size_t max_manifest_bytes = 64u << 20;
  size_t max_tensors = 1u << 20;
  size_t max_dims = 16;
  uint32_t max_world_size = 1u << 16;
  size_t max_blob_bytes = 16u << 20;        // all blobs together
  size_t max_metadata_bytes = 16u << 20;    // all metadata keys and values together
  uint64_t max_total_bytes = 1ull << 46;    // 64 TiB of tensor bytes
};

// Parses and validates a manifest (ranges contiguous, offsets aligned and increasing, sizes
// consistent with dtype and shape, shard digests consistent with their block digests, file names
// plain). Throws CorruptError "<source>: field shards[2].range: ..." naming what is wrong.
Manifest parse_manifest(std::string_view json, std::string_view source, const ManifestLimits& limits = {});
std::string manifest_to_json(const Manifest& manifest);

// The tensor table of a state as it will be saved (names, dtypes, shapes, offsets) and its total
// size. Throws InvalidArgumentError naming the tensor (duplicate or bad name, count != product
// of shape, not CPU memory).
std::vector<TensorInfo> plan_layout(const State& state, uint64_t* total_bytes = nullptr);

// ---------------------------------------------------------------------------------------------
// Saving.

// What a writer reports about its shard (the content of its sidecar file).
struct ShardRecord {
  std::string save_id;
  uint64_t step = 0;
  uint32_t world_size = 1;
  ShardInfo shard;
  uint64_t block_bytes = kDefaultBlockBytes;
  crypto::Digest layout_sha256{};  // digest of the tensor table: all writers must agree
};
std::string shard_record_to_json(const ShardRecord& record);
ShardRecord parse_shard_record(std::string_view json, std::string_view source, const ManifestLimits& limits = {});

struct SaveOptions {
  uint32_t rank = 0;
  uint32_t world_size = 1;
  // Identifies one save attempt: the same string on every writer of the save, a new one for
  // every attempt (rank 0 ignores sidecars of other attempts, e.g. left by a crashed run that
  // saved the same step). Required when world_size > 1, e.g. "<job>-q<quorum id>-s<step>";
  // a random one is made when empty and world_size == 1.
  std::string save_id;
  // After writing the manifest, rank 0 keeps the keep_last highest-step complete checkpoints
  // (0: all) and always removes incomplete directories of lower steps.
  uint32_t keep_last = 0;
  uint64_t block_bytes = kDefaultBlockBytes;  // multiple of 64, 4 KiB .. 1 GiB
  uint32_t io_threads = 2;                    // threads writing and hashing this writer's shard
  // Rank 0 only: wait for the other writers' sidecars and write the manifest. false leaves
  // that to a later finalize() call (e.g. when records travel over the network instead).
  bool finalize = true;
  std::chrono::milliseconds finalize_timeout{std::chrono::minutes(10)};
  std::chrono::milliseconds progress_interval{std::chrono::seconds(5)};  // info log while writing
  const CancelToken* cancel = nullptr;
  // Test hook, called after each block of the shard is written (blocks_done counts them), from
  // a writer thread. May stop or kill the process to inject a crash at a precise point.
  std::function<void(uint64_t blocks_done, uint64_t blocks_total)> after_block;
};

struct SaveResult {
  std::filesystem::path dir;  // ROOT/step-<N>
  uint64_t step = 0;
  ShardRecord record;         // this writer's shard
  bool finalized = false;     // this call wrote the manifest (rank 0)
  double seconds = 0;         // wall time of the call (shard + manifest when finalized)
};

// Writes this writer's shard of `state` under ROOT/step-<state.step>, and, on rank 0 with
// options.finalize, waits for every other writer's sidecar (polling the directory, which is
// expected on a filesystem shared by the writers) up to finalize_timeout, checks them, writes
// the manifest and `latest`, and prunes. Blocks until done.
// Throws: InvalidArgumentError (bad state or options; the step is already complete under ROOT),
// IoError with errno (cannot create or write: ENOSPC, EACCES, ENOTDIR, ...), TimeoutError
// (rank 0: writers missing, named), CorruptError (a sidecar disagrees; named), CancelledError.
// The state is only read, never modified, whatever happens.
SaveResult save(const std::filesystem::path& root, const State& state, const SaveOptions& options = {});

// Rank 0's second half of save(): given the records of all writers (any order; missing ranks
// are read from their sidecar files, waiting as save() does), checks them against `state`'s
// layout, writes the manifest and `latest`, prunes. Returns the manifest written.
Manifest finalize(const std::filesystem::path& root, const State& state, const SaveOptions& options,
                  std::span<const ShardRecord> records = {});

struct CheckpointEntry {
  uint64_t step = 0;
  std::filesystem::path dir;
  bool complete = false;  // has a manifest
};
// step-<N> directories under root, by increasing step. Other names are ignored.
std::vector<CheckpointEntry> list_checkpoints(const std::filesystem::path& root);

// Removes complete checkpoints beyond the keep_last highest steps (0: keep all; the one `latest`
// names is never removed), incomplete directories of steps below the highest complete one, and
// stray temporary files in root. A complete checkpoint is first made incomplete (its manifest
// removed and the directory fsynced), so a crash mid-prune never leaves a half-deleted
// checkpoint that looks complete. Returns the directories removed. `committed` (what a save
// passes: the step it just committed) is never removed, and incomplete directories are removed
// only below it too: saving a step lower than the newest complete one (a run resumed from an
// older checkpoint) neither prunes what it just wrote nor the next steps other writers are
// writing meanwhile.
std::vector<std::filesystem::path> prune(const std::filesystem::path& root, uint32_t keep_last,
                                         std::optional<uint64_t> committed = std::nullopt);

// ---------------------------------------------------------------------------------------------
// Asynchronous saving.

// Saves in the background: save_async() copies this writer's byte range of the state (and the
// metadata and blobs) into a host staging buffer — the only time the caller is blocked — and
// returns; a background thread then writes it as save() does. The caller may change its
// tensors as soon as save_async() returns. One save at a time: save_async() first waits for the
// previous one. Errors are never lost: a failed background save is rethrown by the next
// save_async() (which then does not start a new save) or wait(), once. The staging buffer is
// kept and reused by the next save of the same size or smaller.
class CheckpointWriter {
 public:
  CheckpointWriter(std::filesystem::path root, SaveOptions options = {});
  // Waits for a save in progress; an error nobody collected is logged, not thrown.
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // save_id: see SaveOptions::save_id (overrides options.save_id for this save; required when
  // world_size > 1). Blocks while a previous save runs, then for the copy only.
  void save_async(const State& state, std::string save_id = {});
  // Blocks until the save in progress (if any) is done. Returns its result, nullopt when there
  // was none; throws its error.
  std::optional<SaveResult> wait();
  bool busy() const;
  // Allocates and touches the staging buffer now (bytes of this writer's range), so that the
  // first save_async() does not pay for page faults.
  void reserve(uint64_t bytes);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// Loading.

struct LoadOptions {
  ManifestLimits limits;
  uint32_t io_threads = 4;  // threads reading and verifying blocks (over all shards)
};

// A tensor, or the part of it inside a loaded range.
struct LoadedTensor {
  TensorInfo info;
  uint64_t first_byte = 0;          // offset of `bytes` within the tensor
  std::span<const uint8_t> bytes;   // points into LoadedState::buffer
  bool complete() const { return first_byte == 0 && bytes.size() == info.bytes; }
  // The whole tensor as a buffer view; throws InvalidArgumentError when only part is loaded.
  BufferView view() const;
};

struct LoadedState {
  Manifest manifest;
  std::filesystem::path dir;  // empty for a state received over the network
  ByteRange range;            // the global bytes loaded
  HostBuffer buffer;          // those bytes (range.size() of them)
  std::vector<LoadedTensor> tensors;  // every tensor intersecting `range` (empty ones included
                                      // when inside it), in manifest order
  uint64_t step() const { return manifest.step; }
  // nullptr when the tensor is not (even partly) in this range.
  const LoadedTensor* find(std::string_view name) const;
};

struct ShardCheck {
  uint32_t rank = 0;
  std::string file;
  bool ok = false;
  std::string error;  // empty when ok
};

// An opened checkpoint: its manifest read and validated; shard bytes are read on demand and
// each block is verified before it is returned. The const methods may run concurrently (each
// call opens its own file descriptors); they block until their reads are done.
class Checkpoint {
 public:
  // root_or_dir: a checkpoint directory (with manifest.json) or a root of step-<N> directories,
  // of which the highest-step complete one is opened (`latest` is consulted and a disagreement
  // logged). Throws IoError (errno ENOENT: no complete checkpoint; others), CorruptError
  // (malformed manifest, named with the field).
  static Checkpoint open(const std::filesystem::path& root_or_dir, const LoadOptions& options = {});

  const Manifest& manifest() const { return manifest_; }
  const std::filesystem::path& dir() const { return dir_; }

  // The range partition(total, rank, world_size) of the state: what reader `rank` of
  // `world_size` needs; (0, 1) loads everything. Reads only the blocks that overlap the range,
  // from whichever shards hold them, in parallel. Throws CorruptError naming the shard file
  // (missing, wrong size, block failing its SHA-256), IoError for other read failures.
  LoadedState load(uint32_t rank = 0, uint32_t world_size = 1) const;
  LoadedState load_range(ByteRange range) const;
  // The range's bytes into dest (dest.size() == range.size()); same checks as load(). On
  // failure dest holds unspecified bytes.
  void read_range(ByteRange range, std::span<uint8_t> dest) const;
  // Every tensor of `dest` (matched by name; dtype and shape must agree) filled from the
  // checkpoint, reading through a bounded scratch buffer (no second copy of the state). Tensors of
  // the checkpoint not in dest are skipped; a tensor of dest not in the checkpoint is an
  // InvalidArgumentError, as is a dtype/shape mismatch (checked before any read). On a failed
  // read the destination buffers hold unspecified bytes.
  void load_into(std::span<const TensorView> dest) const;
  // Reads every shard in full and checks its size and every block; never throws for a damaged
  // shard, returns one entry per shard instead.
  std::vector<ShardCheck> verify() const;

 private:
  Checkpoint(std::filesystem::path dir, Manifest manifest, LoadOptions options);
  std::filesystem::path dir_;
  Manifest manifest_;
  LoadOptions options_;
};

// Checkpoint::open(root_or_dir, options).load(rank, world_size).
LoadedState load(const std::filesystem::path& root_or_dir, uint32_t rank = 0, uint32_t world_size = 1,
                 const LoadOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Live state transfer (a healthy peer to a joiner), in the checkpoint format: an offer, the
// manifest of a one-shard checkpoint, then the shard's blocks, each verified against the
// manifest's SHA-256 on receipt; the receiver answers with a verdict.

struct TransferOptions {
  ManifestLimits limits;
  uint64_t max_state_bytes = 1ull << 40;   // receiver: refuse larger states before allocating
  uint64_t block_bytes = kDefaultBlockBytes;  // sender
  uint32_t hash_threads = 2;                  // sender: hashing the state before sending
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};  // the whole transfer
  const CancelToken* cancel = nullptr;
  // Test hook (sender), called after each block is handed to the channel (blocks_sent counts
  // them). May kill the process to inject a sender lost mid-transfer.
  std::function<void(uint64_t blocks_sent, uint64_t blocks_total)> after_block;
};

// Sends `state` (CPU tensors, read during the call) and waits for the receiver's verdict.
// Returns the manifest sent. Throws CorruptError when the receiver reports a failed check,
// PeerLostError / TimeoutError / CancelledError from the transport. After any failure the
// channel is out of step: close it.
Manifest send_state(net::BulkChannel& channel, const State& state, const TransferOptions& options = {});

// Receives a state sent by send_state(). Refuses (ProtocolError) an offer over the limits
// before allocating; throws CorruptError naming the block when a block fails its SHA-256 (after
// telling the sender), and the transport's errors. The result is what load() of the same state
// saved to disk returns (dir empty). After any failure the channel is out of step: close it.
LoadedState receive_state(net::BulkChannel& channel, const TransferOptions& options = {});

}  // namespace meshtrain::checkpoint
