// meshtrain gradient compression: codecs that turn an fp32 gradient into a self-describing
// payload and back, with per-tensor error-feedback state.
//
//   auto codec = compress::make_int8_codec({.block_size = 256});
//   auto state = codec->make_state(compress::TensorSpec::flat(grad.count));   // once per tensor
//   std::vector<uint8_t> payload(codec->encoded_bytes(state->spec()));
//   payload.resize(codec->encode(grad, *state, payload));                     // every step
//   ... send payload ...
//   codec->decode_accumulate(payload, sum);                                    // at the receiver
//
// Codecs: none (fp32 with a header), fp16, bf16, int8 blockwise, top-k, PowerSGD. Each has a
// CPU implementation (the reference, and the path without a GPU) and, for buffers with
// device == Cuda in a build with CUDA, kernels that run on the caller's CUDA stream. See
// docs/compression.md for the payload format, error bounds and the compressed all-reduce
// (Communicator::allreduce_compressed in meshtrain/collective.h).
//
// Thread-safety: a Codec is immutable after construction and its const methods may be called
// from any number of threads at once. A CodecState is used by one thread at a time.
//
// Blocking: every call returns when its work is done. CUDA paths enqueue on the given stream
// and synchronise it before returning (payloads always live in host memory, ready to send).
// Nothing here has a timeout: no call waits on anything but the CPU or the GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "meshtrain/core.h"

namespace meshtrain::compress {

// Stored in the payload header: never renumber.
enum class CodecId : uint8_t { None = 0, Fp16 = 1, Bf16 = 2, Int8 = 3, TopK = 4, PowerSgd = 5 };
std::string_view codec_name(CodecId id) noexcept;  // "none", "fp16", "bf16", "int8", "topk", "powersgd"

enum class Rounding : uint8_t { Nearest = 0, Stochastic = 1 };

// The cudaStream_t to run on (as void*, so that this header needs no CUDA headers). nullptr:
// the legacy default stream. Ignored for CPU buffers.
struct CudaStream {
  void* handle = nullptr;
};

// What a state is made for: the tensor's shape (row-major; PowerSGD views it as
// shape[0] x product(rest)) and where its gradients live.
struct TensorSpec {
  std::vector<size_t> shape;  // {} is a scalar (1 element)
  DeviceKind device = DeviceKind::Cpu;
  int device_index = 0;

  static TensorSpec flat(size_t count, DeviceKind device = DeviceKind::Cpu, int device_index = 0) {
    return TensorSpec{{count}, device, device_index};
  }
  size_t count() const;  // product of shape; throws InvalidArgumentError on overflow
};

// Counters of one tensor's state. `last_*` are from the latest successful encode, `total_*`
// from all of them.
struct CodecStats {
  uint64_t encodes = 0;
  // fp16 / bf16: values whose magnitude would round past the largest finite value (65504 for
  // fp16), sent as that value with their sign. A loss scaler should treat these as overflow.
  uint64_t last_clamped = 0;
  uint64_t total_clamped = 0;
  // fp16 / bf16: non-zero values that became +-0 (underflow; a sign the loss scale is low).
  uint64_t last_flushed = 0;
  uint64_t total_flushed = 0;
  size_t last_payload_bytes = 0;
  // top-k with the sampled selection: encodes whose sample did not bracket the threshold, so
  // that the radix select ran after it (the same payload, slower). Many misses mean data unlike
  // its sample (TopKOptions::Selection).
  uint64_t sampled_misses = 0;
};

// Per-tensor state: the error-feedback residual (what earlier steps did not send), PowerSGD's
// warm-started Q, the stochastic-rounding step counter and the stats. Made by
// Codec::make_state, owned by the caller (one per tensor, kept across steps), read and written
// only by the codec that made it. A CUDA tensor's residual lives on its device.
class CodecState {
 public:
  virtual ~CodecState();
  CodecState& operator=(const CodecState&) = delete;

  CodecId codec() const noexcept { return codec_; }
  const TensorSpec& spec() const noexcept { return spec_; }
  size_t count() const noexcept { return count_; }
  const CodecStats& stats() const noexcept { return stats_; }

  // A host copy of the error-feedback residual (count() fp32 values); empty for codecs
  // without one (none, fp16, bf16, or error feedback turned off). Blocks on a device copy.
  virtual std::vector<float> residual() const;
  // Forgets the residual (zero) and restarts warm starts and counters; keeps the tensor spec.
  virtual void reset();
  // An independent copy of everything later encodes depend on (residual, Q, encode counter,
  // stats; not scratch buffers), on the same device: a snapshot to roll an encode back to, as
  // the compressed all-reduce does for PowerSGD (the other codecs stage, below). Blocks on a
  // device copy.
  virtual std::unique_ptr<CodecState> clone() const = 0;

  // Staged encodes, the cheap form of a snapshot for an encode that may have to be undone (the
  // compressed all-reduce's attempt that fails or is retried). After stage(), every encode
  // starts from the committed state (residual, encode counter, stats) and leaves its result
  // pending: the committed state stays as it was, and a second staged encode replaces the
  // first one's result (a staged encode that throws leaves nothing pending). commit_staged() makes the latest pending result the state,
  // discard_staged() drops it; both end staging (and do nothing when not staging). The bytes
  // and the committed result are those of an encode on a clone(). int8 and top-k write the new
  // residual into a second buffer they keep (on the CPU: no copy; on a CUDA device the
  // residual is copied once per stage()). none, fp16 and bf16 stage only the counters.
  // PowerSGD states do not stage: stage() throws InvalidArgumentError (use clone()).
  virtual void stage();
  virtual void commit_staged();
  virtual void discard_staged();
  bool staging() const noexcept { return staging_; }

 protected:
  CodecState(CodecId codec, TensorSpec spec);
  CodecState(const CodecState&) = default;  // for clone()
  CodecStats& mutable_stats() noexcept { return stats_; }
  bool staging_ = false;  // set and cleared by the stage() overrides

 private:
  CodecId codec_;
  TensorSpec spec_;
  size_t count_;
  CodecStats stats_;
};

// A codec: configuration only (block size, fraction, rank, rounding, seed); all per-tensor
// data is in CodecState.
//
// Non-finite gradients: encode rejects a gradient holding NaN or +-Inf with
// InvalidArgumentError naming the first such element's index and value, before it changes
// the state (the residual, Q and counters are as before the call); `out` is unspecified.
// Payloads never hold NaN or Inf: decoders reject them as CorruptError.
//
// Payload validation: decode and decode_accumulate check the header (magic, codec, version,
// element count against `out`, parameters, and that the payload is exactly as long as the
// header implies: ProtocolError otherwise) and the body's structure (top-k indices in range
// and strictly increasing, scales and values finite: CorruptError otherwise). They never read
// outside `payload` nor write outside `out`. Bit flips that keep a payload well-formed (a
// changed fp16 mantissa) are not detectable here: the bulk transport's AEAD tag is what
// authenticates the bytes.
class Codec {
 public:
  virtual ~Codec();

  virtual CodecId id() const noexcept = 0;
  std::string_view name() const noexcept { return codec_name(id()); }
  // The configuration, e.g. "int8(block_size=256, rounding=nearest, error_feedback=on)".
  virtual std::string describe() const = 0;

  // A fresh state for one tensor. Throws InvalidArgumentError for a spec the codec cannot
  // handle (a CUDA device in a build without CUDA, top-k on more than 2^32 elements).
  virtual std::unique_ptr<CodecState> make_state(const TensorSpec& spec) const = 0;

  // Bytes of the payload for a tensor of this spec, known before encoding. Exact for every
  // codec here (encode returns the same number); a future variable-size codec may return an
  // upper bound, so callers size buffers with this and send what encode returns.
  virtual size_t encoded_bytes(const TensorSpec& spec) const = 0;
  size_t encoded_bytes(size_t count) const { return encoded_bytes(TensorSpec::flat(count)); }

  // Encodes `grad` (fp32, count == state.count(), on state.spec()'s device) into `out` (host
  // memory, at least encoded_bytes(state.spec()) bytes) and updates the state's residual. The
  // payload is a deterministic function of (codec configuration, grad, state): the same inputs
  // give the same bytes on every host, and the CUDA path gives the CPU path's bytes. Returns
  // the bytes written, every one of them set by the encode (reserved and padding bytes too: the
  // compressed all-reduce reuses its payload buffers without clearing them).
  // Throws InvalidArgumentError (wrong dtype, count, device, state of another codec, `out` too
  // small, a non-finite element).
  virtual size_t encode(BufferView grad, CodecState& state, std::span<uint8_t> out,
                        CudaStream stream = {}) const = 0;

  // out = the decoded tensor. `out` is fp32 with the payload's element count, on the CPU or a
  // CUDA device. On error `out` is unspecified.
  virtual void decode(std::span<const uint8_t> payload, BufferView out,
                      CudaStream stream = {}) const = 0;
  // out += the decoded tensor (what the owner of a chunk in a compressed all-reduce does with
  // each peer's payload). The whole payload is validated before `out` is touched: on error
  // `out` is unchanged.
  virtual void decode_accumulate(std::span<const uint8_t> payload, BufferView out,
                                 CudaStream stream = {}) const = 0;
};

// ---- the codecs
std::unique_ptr<Codec> make_none_codec();

// fp16 / bf16: round to nearest even; out-of-range values are clamped and counted
// (CodecStats::last_clamped). No error feedback.
std::unique_ptr<Codec> make_fp16_codec();
std::unique_ptr<Codec> make_bf16_codec();

struct Int8Options {
  uint32_t block_size = 256;  // elements per absmax scale, 1 ..= 1 << 20
  Rounding rounding = Rounding::Nearest;
  uint64_t seed = 0;          // stochastic rounding: noise = hash(seed, encode count, index)
  bool error_feedback = true;
};
std::unique_ptr<Codec> make_int8_codec(const Int8Options& options = {});

struct TopKOptions {
  // k = ceil(fraction * count), at least 1 for a non-empty tensor. 0 < fraction <= 1.
  double fraction = 0.01;
  bool error_feedback = true;
  // How an encode finds the k largest magnitudes; the payload is the same every way (the CPU's
  // radix select is the one reference). Radix: three histogram passes over the tensor, then a
  // compaction (on the CPU the last two passes and the compaction run only on the elements at
  // or above the bottom of the first pass's threshold bin, unless those are more than a quarter
  // of the tensor; verified on an H100). Sampled: a sample of the keys bounds the k-th largest,
  // then two passes (GPU: one gathers the bracket, one writes; CPU: one pass that also adds the
  // residual gathers what is above the bound), falling back to Radix when the bound misses (data
  // unlike its sample; CodecStats::sampled_misses counts it). Where sampling cannot prune (on the
  // CPU: below about 70,000 elements at 0.1% or 104,000 at 1%, or fractions above about 3.3%)
  // Radix runs. Auto: Sampled for CPU tensors (2.3x faster at 1% of 64 MiB, docs/benchmarks.md),
  // and after a miss Radix for that state's next 16 encodes; Radix for CUDA tensors, as the
  // sampled kernels have not run on a GPU yet (docs/compression.md).
  enum class Selection { Auto, Radix, Sampled };
  Selection selection = Selection::Auto;
};
std::unique_ptr<Codec> make_topk_codec(const TopKOptions& options = {});

struct PowerSgdOptions {
  uint32_t rank = 4;  // 1 ..= 64
  uint64_t seed = 0;  // initial Q; peers of one job must agree on it
  bool error_feedback = true;
};
std::unique_ptr<Codec> make_powersgd_codec(const PowerSgdOptions& options = {});

// Parses "none", "fp16", "bf16", "int8", "int8:block_size=128,rounding=stochastic,seed=7",
// "topk:fraction=0.001,selection=sampled", "powersgd:rank=2,error_feedback=off".
// InvalidArgumentError naming the bad key or value.
std::unique_ptr<Codec> make_codec(std::string_view spec);

// ---- PowerSGD in an all-reduce, by linearity (docs/compression.md, "The compressed
// all-reduce", 6). A sum of the members' rank-r payloads is not rank r, so an all-reduce runs
// the power iteration on the members' average instead, with two plain fp32 all-reduces:
//   powersgd_project:      M = grad + residual (kept in the state);  p = M Q      (rows x r)
//   ... p is summed over the members ...
//   powersgd_back_project: p is orthonormalised in place;            q = M^T p    (cols x r)
//   ... q is averaged (or summed) over the members ...
//   powersgd_finish:       out = p q^T;  residual = M - p q^T;  Q = q (the next warm start)
// Members that start from the same Q and all-reduce the same p and q get the same bytes out.
// A shape with rank 0 (1-D, or r(rows + cols) >= rows * cols) is not compressed: the caller
// all-reduces the gradient itself and calls none of these. p and q are in host memory; grad,
// out, M and the residual are on the state's device (a CUDA state runs the products there, on
// `stream`, with the CPU's bits). A state of another codec, or a buffer on another device, is
// an InvalidArgumentError; the project step rejects NaN/Inf like encode.
struct LowRankShape {
  size_t rows = 0, cols = 0, rank = 0;  // rank 0: sent uncompressed
};
LowRankShape powersgd_shape(const CodecState& state);
void powersgd_project(BufferView grad, CodecState& state, std::span<float> p, CudaStream stream = {});
void powersgd_back_project(CodecState& state, std::span<float> p, std::span<float> q, CudaStream stream = {});
void powersgd_finish(CodecState& state, std::span<const float> p, std::span<const float> q, BufferView out,
                     CudaStream stream = {});
// For a member that added zeros to this step (a joiner, or one back after missed steps): takes
// the step's q as its next warm start, as powersgd_finish does for the contributors, and keeps
// its residual and counters. Its next contribution then uses the same Q as everyone else's.
void powersgd_adopt_q(CodecState& state, std::span<const float> q);
// Makes `into` what from.clone() would be (residual, Q, counters), in into's own memory: no
// allocation, and into's scratch (a CUDA state's device factors) is kept. For the all-reduce's
// copy per attempt, into a state an earlier step replaced. Both must be PowerSGD states of the
// same tensor spec, rank, seed and error feedback (else InvalidArgumentError). Blocks on a
// device copy (on `stream`).
void powersgd_copy_state(const CodecState& from, CodecState& into, CudaStream stream = {});

// ---- payloads
// The header every payload starts with, as read by inspect_payload. 32 bytes, little-endian.
struct PayloadInfo {
  CodecId codec;
  uint8_t version;
  uint8_t flags;    // int8: 1 = stochastic rounding; powersgd: 1 = sent uncompressed
  size_t count;     // elements of the decoded tensor
  uint64_t param_a; // int8: block size; topk: k; powersgd: rows
  uint64_t param_b; // powersgd: rank; 0 otherwise
  size_t bytes;     // total payload bytes the header implies
};
constexpr size_t kPayloadHeaderBytes = 32;

// Reads and checks the header of `payload` (not the body): ProtocolError for a short,
// malformed or inconsistent header, or when payload.size() differs from what it implies.
PayloadInfo inspect_payload(std::span<const uint8_t> payload);

}  // namespace meshtrain::compress
