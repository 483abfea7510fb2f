// Internal: the CUDA side of the compression codecs (lib/compress calls these). Not installed.
//
// C++17 and no CUDA or torch headers, so that lib/compress includes it without #ifdef: in a
// build with CUDA the functions come from the .cu files beside this header, otherwise from
// nocuda.cpp, where available() is false and every other function throws CudaFailure.
//
// Conventions, for every function below:
// - Pointers named d_* are device memory on `device`; h_* are host memory.
// - `stream` is a cudaStream_t (nullptr: the legacy default stream). Work is enqueued on it.
//   Functions documented "blocks" synchronise the stream before returning; the others only
//   enqueue (their inputs must stay valid until the stream has passed them).
// - The current device is set to `device` for the call and restored afterwards.
// - A CUDA error becomes CudaFailure naming the call, the device and cudaGetErrorString.
// - The element-wise math is the same as the CPU reference's: the shared parts live in
//   codec_math.h, which both compilers see.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace meshtrain::cuda::compress {

// A CUDA runtime failure (or a call in a build without CUDA). lib/compress turns it into a
// meshtrain::InternalError / InvalidArgumentError with the codec's context.
class CudaFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// True when meshtrain was built with CUDA (the kernels exist); says nothing about devices.
bool available() noexcept;

// Owning device allocation. Move-only; frees on destruction (errors there are ignored).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, int device);  // zero-filled; throws CudaFailure
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const noexcept { return data_; }
  size_t bytes() const noexcept { return bytes_; }
  int device() const noexcept { return device_; }
  template <typename T>
  T* as() const noexcept { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  int device_ = 0;
};

// Stream-ordered device memory (cudaMallocAsync / cudaFreeAsync on `stream`), not zero-filled:
// for a temporary that work on that stream uses, such as a payload copied up to be decoded. No
// device-wide synchronisation on allocation or free (cudaFree has one, and DeviceBuffer's zero
// fill waits for the legacy stream, i.e. for a training step's kernels). Move-only; the free is
// enqueued on the stream, after the work that uses the memory.
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, int device, void* stream);  // throws CudaFailure
  ~StreamBuffer();
  StreamBuffer(StreamBuffer&& other) noexcept;
  StreamBuffer& operator=(StreamBuffer&&) = delete;
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;

  void* data() const noexcept { return data_; }
  template <typename T>
  T* as() const noexcept { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
  int device_ = 0;
  void* stream_ = nullptr;
};

// Page-locked ("pinned") host memory, usable with every device (cudaHostAllocPortable): copies
// between it and a device run by DMA at the link's speed, and without the driver staging them
// through its own bounce buffer as it does for pageable memory. Costly to allocate (the pages
// are locked one by one): for buffers kept across operations. Allocated in `device`'s context
// (no other device's context is made). nullptr when the host refuses for want of memory it can
// lock (cudaErrorMemoryAllocation); any other failure throws CudaFailure.
void* allocate_pinned(size_t bytes, int device);
void free_pinned(void* p) noexcept;

// A new non-blocking stream on `device` (for tests and benchmarks), and its destruction.
void* stream_create(int device);
void stream_destroy(void* stream, int device) noexcept;

// cudaMemcpyAsync(cudaMemcpyDefault): either side may be host or device memory. Enqueues.
void copy_async(void* dst, const void* src, size_t bytes, int device, void* stream);
// Blocks until `stream` is idle.
void synchronize(int device, void* stream);
// d_x[0, bytes) = 0. Enqueues.
void zero_async(void* d_x, size_t bytes, int device, void* stream);

// Index of the first element of d_x[0, n) that is NaN or +-Inf; n when all are finite. Blocks.
size_t find_nonfinite(const float* d_x, size_t n, int device, void* stream);

// d_acc[i] += d_x[i]. Enqueues.
void add_async(float* d_acc, const float* d_x, size_t n, int device, void* stream);
// d_x[i] *= factor. Enqueues.
void scale_async(float* d_x, size_t n, float factor, int device, void* stream);

// ---- casts (cast.cu). Inputs must be finite (checked before with find_nonfinite).
struct CastCounts {
  uint64_t clamped = 0;  // |x| would round past the largest finite value: clamped to it
  uint64_t flushed = 0;  // x != 0 rounded to (signed) zero
};
// d_out[i] = the fp16 / bf16 bits of d_x[i] (round to nearest even, clamped). Blocks.
CastCounts fp32_to_fp16(const float* d_x, uint16_t* d_out, size_t n, int device, void* stream);
CastCounts fp32_to_bf16(const float* d_x, uint16_t* d_out, size_t n, int device, void* stream);
// d_out[i] = (or +=, with accumulate) the fp32 value of d_in[i]. Enqueues.
void fp16_to_fp32(const uint16_t* d_in, float* d_out, size_t n, bool accumulate, int device,
                  void* stream);
void bf16_to_fp32(const uint16_t* d_in, float* d_out, size_t n, bool accumulate, int device,
                  void* stream);

// ---- int8 blockwise (int8.cu). One pass per block of `block` elements (the last may be
// shorter): v = x + residual (residual may be null: no error feedback), scale = absmax(v)/127,
// q = round(v / scale) (nearest even, or stochastic with codec_math.h's hash of seed, step and
// element index), residual = v - q * scale. Enqueues.
void int8_quantize(const float* d_x, float* d_residual, size_t n, uint32_t block, bool stochastic,
                   uint64_t seed, uint64_t step, int8_t* d_q, float* d_scales, int device,
                   void* stream);
// d_out[i] = (or +=) d_q[i] * d_scales[i / block]. Enqueues.
void int8_dequantize(const int8_t* d_q, const float* d_scales, size_t n, uint32_t block,
                     float* d_out, bool accumulate, int device, void* stream);

// ---- top-k (topk.cu). Keys are the bits of |v| (monotonic in |v| for finite v).
// magnitude_histogram and topk_compact take a caller-owned device workspace d_work of
// work_bytes (checked: CudaFailure when too small) instead of allocating their own, so that a
// codec allocates everything before it writes its state and an encode allocates nothing (a
// cudaFree synchronises the whole device).
// The widest digit magnitude_histogram counts (bits <= this).
inline constexpr uint32_t kTopKMaxHistogramBits = 11;
// Workspace bytes that either function needs for n elements (any bits up to the maximum).
size_t topk_workspace_bytes(size_t n);
// h_hist[b] = number of i with ((key_i >> shift) & ((1 << bits) - 1)) == b among the i whose
// key agrees with `prefix` on the bits above shift + bits (prefix_bits of them; 0: all). Blocks.
// warp_aggregated: the lanes of a warp that share a digit add once (the same counts; measured by
// meshtrain-bench-compress's select_*_aggregated records, not yet used by the codec: it has not
// run on a GPU).
void magnitude_histogram(const float* d_v, size_t n, uint32_t shift, uint32_t bits,
                         uint32_t prefix, uint32_t prefix_bits, uint64_t* h_hist, void* d_work,
                         size_t work_bytes, int device, void* stream, bool warp_aggregated = false);
// Selects every i with key_i > threshold and the first `ties` (in index order) with
// key_i == threshold; writes them in index order to d_idx / d_val (k = count of them) and, when
// d_clear is not null, sets those d_clear[i] = 0 (what is sent leaves the residual: d_clear is
// d_v with error feedback; without it nothing is written back, so d_v can be the gradient). Blocks.
// Counts that cannot make k: CudaFailure, nothing written. device_scan: the tiles' prefixes are
// summed on the device instead of on the host between the two kernels (the same output;
// measured by meshtrain-bench-compress's select_compact_device_scan, not yet used by the codec:
// it has not run on a GPU).
void topk_compact(const float* d_v, float* d_clear, size_t n, uint32_t threshold, uint64_t ties,
                  uint32_t* d_idx, float* d_val, uint64_t k, void* d_work, size_t work_bytes, int device,
                  void* stream, bool device_scan = false);

// ---- top-k bracketed by a sample (topk.cu): the same selection as the radix select followed by
// topk_compact, in two passes over the data instead of five. Not yet run on a GPU: the codec
// takes it with "selection=sampled" only (TopKOptions::Selection).
//
// A sample of m = min(n, kTopKSamples) keys, one from each of m strata of about n / m elements at
// a hashed offset (codec_math.h topk_sample_index), is sorted on the device; the k-th largest key of all
// is bracketed by two of its order statistics [lo, hi], kTopKSampleSigmas sample standard
// deviations (+ kTopKSampleSlack) either side of the rank where it would sit. One pass counts,
// per tile, the keys above hi and gathers those in [lo, hi] (the candidates) with their indices.
// When the bracket holds (above <= k <= above + candidates, and the candidates fit their
// buffer), the candidates are sorted by (key descending, index ascending) and the first
// k - above are sent: the last of them gives the threshold key T and the cutoff index c, and the
// selection is "key > T, or key == T and i <= c", which is the radix select's (ties to the lower
// index). A write pass compacts that in index order, as topk_compact does. Candidates beyond the
// buffer in a bracket of one key (lo == hi: ties, such as a sparse gradient's zeros) make that
// key the threshold: topk_compact sends k - above of its ties.
inline constexpr uint64_t kTopKSamples = uint64_t(1) << 18;
// The CPU's sampled selection (lib/compress/topk.cpp) draws fewer: it pays for the sample's
// order statistic (nth_element) and little per candidate.
inline constexpr uint64_t kTopKCpuSamples = uint64_t(1) << 15;
inline constexpr double kTopKSampleSigmas = 8.0;
inline constexpr uint64_t kTopKSampleSlack = 32;

struct TopKSamplePlan {
  uint64_t samples = 0;   // m
  uint64_t lo_rank = 0;   // ascending ranks in the sorted sample of the bracket's ends
  uint64_t hi_rank = 0;
  bool lo_open = false;   // lo_rank == 0: no lower bound (every key <= hi is a candidate)
  bool hi_open = false;   // hi_rank == m - 1: no upper bound (nothing is "above")
  uint64_t capacity = 0;  // candidates kept: 3 times the expected number + 8192, at most n
};
// 1 <= k <= n. The CPU's selection (lib/compress/topk.cpp) draws fewer samples (max_samples).
inline TopKSamplePlan topk_sample_plan(uint64_t n, uint64_t k, uint64_t max_samples = kTopKSamples) {
  TopKSamplePlan p;
  p.samples = n < max_samples ? n : max_samples;
  const double m = static_cast<double>(p.samples), q = static_cast<double>(k) / static_cast<double>(n);
  // Ascending, the k-th largest of n sits at rank n - k; in the sample, near (n - k) * m / n.
  uint64_t at = static_cast<uint64_t>(static_cast<double>(n - k) / static_cast<double>(n) * m);
  if (at > p.samples - 1) at = p.samples - 1;
  const uint64_t reach = static_cast<uint64_t>(std::ceil(kTopKSampleSigmas * std::sqrt(m * q * (1.0 - q)))) +
                         kTopKSampleSlack;
  p.lo_rank = at > reach ? at - reach : 0;
  p.hi_rank = p.samples - 1 - at > reach ? at + reach : p.samples - 1;
  p.lo_open = p.lo_rank == 0;
  p.hi_open = p.hi_rank == p.samples - 1;
  const double expected = static_cast<double>(p.hi_rank - p.lo_rank + 1) / m * static_cast<double>(n);
  const double capacity = 3.0 * std::ceil(expected) + 8192.0;
  p.capacity = capacity >= static_cast<double>(n) ? n : static_cast<uint64_t>(capacity);
  return p;
}
// Workspace bytes topk_select_sampled needs for n elements and this k (includes the device
// sorts' temporary storage, which CUDA is asked for on `device`).
size_t topk_sampled_workspace_bytes(size_t n, uint64_t k, int device);
// The selection of the k (1 <= k <= n) largest magnitudes of d_v[0, n) into d_idx / d_val in index
// order, with d_clear as topk_compact's; returns true. Returns false, having written nothing,
// when the sample's bracket missed (data unlike its sample, or more ties at the threshold than
// the buffer holds in a bracket of several keys): the caller then runs the radix select.
// *candidates (when not null): how many keys the bracket held. n < 2^32. Blocks.
bool topk_select_sampled(const float* d_v, float* d_clear, size_t n, uint64_t k, uint32_t* d_idx, float* d_val,
                         void* d_work, size_t work_bytes, int device, void* stream,
                         uint64_t* candidates = nullptr);

// d_out[d_idx[j]] += d_val[j] for j < k (indices distinct, validated by the caller). Enqueues.
void scatter_add(const uint32_t* d_idx, const float* d_val, uint64_t k, float* d_out, int device,
                 void* stream);

// ---- PowerSGD's products (powersgd.cu; powersgd_kernels.cuh says how), in the CPU reference's
// order, so that they give its bits. M is rows x cols, P rows x r, Q cols x r, all row-major fp32
// on `device`; 1 <= r <= 64. Each enqueues.
// d_p = M Q.
void lowrank_project(const float* d_m, const float* d_q, size_t rows, size_t cols, uint32_t r, float* d_p,
                     int device, void* stream);
// d_q = M^T P.
void lowrank_back_project(const float* d_m, const float* d_p, size_t rows, size_t cols, uint32_t r, float* d_q,
                          int device, void* stream);
// d_out = P Q^T (Assign), d_out += P Q^T (Add: decode_accumulate), d_out -= P Q^T (Subtract: the
// residual's update).
enum class LowRankWrite : int { Assign = 0, Add = 1, Subtract = 2 };
void lowrank_reconstruct(const float* d_p, const float* d_q, size_t rows, size_t cols, uint32_t r, float* d_out,
                         LowRankWrite write, int device, void* stream);

}  // namespace meshtrain::cuda::compress
