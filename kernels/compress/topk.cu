// kernels/compress/api.h: top-k threshold selection without a sort (magnitude histograms for
// the host's radix select, lib/compress/topk.cpp), order-preserving compaction, and the
// scatter-add of sparse payloads.
//
// Compaction: tiles of kTile elements. A count pass gives each tile its number of keys above
// the threshold (gt) and equal to it (eq); the host turns those into exclusive prefixes (or,
// with device_scan, one block of the device does: a candidate not yet run on a GPU); the
// write pass walks each tile in index order, 256 elements at a time, ranking them with warp
// ballots. Element i is sent when key > T, or key == T and fewer than `ties` equal keys come
// before it; it goes to position gt_before(i) + min(eq_before(i), ties), so the output is in
// index order and equals the CPU's.
#include <vector>

#include "codec_math.h"
#include "cuda_util.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;
namespace math = meshtrain::compress::math;

namespace {

constexpr unsigned kTileChunks = 16;
constexpr size_t kTile = size_t(kThreads) * kTileChunks;

// A block's shared-memory bins: zeroed before counting, added to the global bins after.
__device__ __forceinline__ void clear_bins(uint32_t* local, uint32_t bins) {
  for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
}

__device__ __forceinline__ void flush_bins(const uint32_t* local, uint32_t bins, unsigned long long* hist) {
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
}

__global__ void histogram_kernel(const float* v, size_t n, uint32_t shift, uint32_t bits, uint32_t prefix,
                                 unsigned long long* hist) {
  extern __shared__ uint32_t local[];
  const uint32_t bins = 1u << bits, mask = bins - 1, above = shift + bits;
  clear_bins(local, bins);
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = math::magnitude_key(v[i]);
    // Keys are 31-bit, so for the first pass (above == 31) every key matches prefix 0.
    if ((above >= 32 ? 0u : key >> above) == prefix) atomicAdd(&local[(key >> shift) & mask], 1u);
  }
  flush_bins(local, bins, hist);
}

// The same counts, with the lanes of a warp that share a digit adding once (__match_any_sync):
// gaussian magnitudes fall into a few dozen of the first pass's bins, where the plain kernel's
// shared-memory atomics serialise (an H100 ran pass 1 at 0.27 of a copy's rate, passes 2 and 3
// at 0.87-1.00). Every lane of a warp runs the loop the same number of times (its bound is the
// warp's first index), so the full-mask match is valid; lanes past the end count nothing.
__global__ void histogram_aggregated_kernel(const float* v, size_t n, uint32_t shift, uint32_t bits,
                                            uint32_t prefix, unsigned long long* hist) {
  extern __shared__ uint32_t local[];
  constexpr uint32_t kNoBin = 0xffffffffu;
  const uint32_t bins = 1u << bits, mask = bins - 1, above = shift + bits;
  clear_bins(local, bins);
  const unsigned lane = threadIdx.x & 31;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t base = size_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u); base < n; base += stride) {
    const size_t i = base + lane;
    uint32_t digit = kNoBin;
    if (i < n) {
      const uint32_t key = math::magnitude_key(v[i]);
      if ((above >= 32 ? 0u : key >> above) == prefix) digit = (key >> shift) & mask;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (digit != kNoBin && lane == unsigned(__ffs(peers) - 1)) atomicAdd(&local[digit], unsigned(__popc(peers)));
  }
  flush_bins(local, bins, hist);
}

__global__ void tile_count_kernel(const float* v, size_t n, uint32_t threshold, uint32_t* gt, uint32_t* eq) {
  const size_t tile_begin = size_t(blockIdx.x) * kTile;
  uint32_t g = 0, e = 0;
  for (unsigned c = 0; c < kTileChunks; ++c) {
    const size_t i = tile_begin + size_t(c) * blockDim.x + threadIdx.x;
    const uint32_t key = i < n ? math::magnitude_key(v[i]) : 0u;
    g += __syncthreads_count(i < n && key > threshold);
    e += __syncthreads_count(i < n && key == threshold);
  }
  if (threadIdx.x == 0) {
    gt[blockIdx.x] = g;
    eq[blockIdx.x] = e;
  }
}

// totals (the device scan's; null when the host checked them): when the tiles' counts cannot
// make k, nothing is written, so the residual stays as it was and the host reports it.
__global__ void tile_write_kernel(const float* v, float* clear, size_t n, uint32_t threshold, unsigned long long ties,
                                  const unsigned long long* gt_before_tile,
                                  const unsigned long long* eq_before_tile, uint32_t* idx, float* val,
                                  unsigned long long k, const unsigned long long* totals) {
  if (totals != nullptr && totals[0] + (totals[1] < ties ? totals[1] : ties) != k) return;
  __shared__ uint32_t warp_gt[kThreads / 32], warp_eq[kThreads / 32];
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  unsigned long long gt_before = gt_before_tile[blockIdx.x], eq_before = eq_before_tile[blockIdx.x];
  const size_t tile_begin = size_t(blockIdx.x) * kTile;
  for (unsigned c = 0; c < kTileChunks; ++c) {
    const size_t i = tile_begin + size_t(c) * blockDim.x + threadIdx.x;
    const uint32_t key = i < n ? math::magnitude_key(v[i]) : 0u;
    const bool is_gt = i < n && key > threshold, is_eq = i < n && key == threshold;
    const unsigned bg = __ballot_sync(0xffffffffu, is_gt), be = __ballot_sync(0xffffffffu, is_eq);
    if (lane == 0) {
      warp_gt[warp] = __popc(bg);
      warp_eq[warp] = __popc(be);
    }
    __syncthreads();
    unsigned long long g = gt_before + __popc(bg & lanes_below), e = eq_before + __popc(be & lanes_below);
    unsigned long long chunk_gt = 0, chunk_eq = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) {
      if (w < warp) {
        g += warp_gt[w];
        e += warp_eq[w];
      }
      chunk_gt += warp_gt[w];
      chunk_eq += warp_eq[w];
    }
    if (is_gt || (is_eq && e < ties)) {
      const unsigned long long pos = g + (e < ties ? e : ties);
      if (pos < k) {
        idx[pos] = static_cast<uint32_t>(i);
        val[pos] = v[i];
      }
      if (clear) clear[i] = 0.0f;
    }
    gt_before += chunk_gt;
    eq_before += chunk_eq;
    __syncthreads();  // warp_gt / warp_eq are rewritten by the next chunk
  }
}

// The tiles' exclusive prefixes (gt then eq) and totals computed on the device by one block of
// kScanThreads, kScanThreads tiles at a time (warp shuffles, then the warps' sums), instead of a
// copy to the host and back between the two compaction kernels.
constexpr unsigned kScanThreads = 1024;

__device__ __forceinline__ unsigned long long warp_inclusive_sum(unsigned long long v, unsigned lane) {
  for (unsigned o = 1; o < 32; o <<= 1) {
    const unsigned long long up = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += up;
  }
  return v;
}

__global__ void tile_scan_kernel(const uint32_t* gt, const uint32_t* eq, size_t tiles, unsigned long long* before,
                                 unsigned long long* totals) {
  __shared__ unsigned long long warp_g[kScanThreads / 32], warp_e[kScanThreads / 32];
  __shared__ unsigned long long carry_g, carry_e;
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x / 32;
  if (threadIdx.x == 0) carry_g = carry_e = 0;
  __syncthreads();
  for (size_t base = 0; base < tiles; base += blockDim.x) {
    const size_t t = base + threadIdx.x;
    const unsigned long long g = t < tiles ? gt[t] : 0, e = t < tiles ? eq[t] : 0;
    const unsigned long long ig = warp_inclusive_sum(g, lane), ie = warp_inclusive_sum(e, lane);
    if (lane == 31) {
      warp_g[warp] = ig;
      warp_e[warp] = ie;
    }
    __syncthreads();
    if (warp == 0) {  // the warps' sums, scanned in place (inclusive)
      const unsigned long long wg = lane < warps ? warp_g[lane] : 0, we = lane < warps ? warp_e[lane] : 0;
      const unsigned long long sg = warp_inclusive_sum(wg, lane), se = warp_inclusive_sum(we, lane);
      if (lane < warps) {
        warp_g[lane] = sg;
        warp_e[lane] = se;
      }
    }
    __syncthreads();
    const unsigned long long below_g = carry_g + (warp ? warp_g[warp - 1] : 0) + ig - g;
    const unsigned long long below_e = carry_e + (warp ? warp_e[warp - 1] : 0) + ie - e;
    if (t < tiles) {
      before[t] = below_g;
      before[tiles + t] = below_e;
    }
    __syncthreads();  // everyone has read carry and the warps' sums
    if (threadIdx.x == 0) {
      carry_g += warp_g[warps - 1];
      carry_e += warp_e[warps - 1];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    totals[0] = carry_g;
    totals[1] = carry_e;
  }
}

// The caller's workspace (topk_workspace_bytes). magnitude_histogram: the 2^bits 64-bit bins.
// topk_compact: the per-tile counts (gt then eq, 32-bit), then at an aligned offset their
// exclusive prefixes (gt then eq, 64-bit), then the two totals (device_scan): separate regions,
// so that the upload of the prefixes never lands on counts that a copy to the host may still
// be reading.
constexpr size_t kWorkAlign = 256;

size_t work_align(size_t bytes) { return (bytes + kWorkAlign - 1) / kWorkAlign * kWorkAlign; }
size_t tiles_for(size_t n) { return (n + kTile - 1) / kTile; }
size_t histogram_work_bytes(uint32_t bits) { return (size_t(1) << bits) * sizeof(unsigned long long); }
size_t compact_counts_bytes(size_t tiles) { return work_align(2 * tiles * sizeof(uint32_t)); }
size_t compact_work_bytes(size_t n) {
  const size_t tiles = tiles_for(n);
  return compact_counts_bytes(tiles) + (2 * tiles + 2) * sizeof(unsigned long long);  // prefixes, totals
}

void require_work(const char* what, const void* d_work, size_t work_bytes, size_t needed) {
  if (needed == 0 || (d_work != nullptr && work_bytes >= needed)) return;
  throw CudaFailure(std::string(what) + ": workspace of " + std::to_string(work_bytes) + " bytes" +
                    (d_work == nullptr ? " (null)" : "") + ", needs " + std::to_string(needed) +
                    " (topk_workspace_bytes)");
}

__global__ void scatter_add_kernel(const uint32_t* idx, const float* val, unsigned long long k, float* out) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t j = size_t(blockIdx.x) * blockDim.x + threadIdx.x; j < k; j += stride)
    out[idx[j]] = math::add_rn(out[idx[j]], val[j]);
}

}  // namespace

size_t topk_workspace_bytes(size_t n) {
  return std::max(histogram_work_bytes(kTopKMaxHistogramBits), compact_work_bytes(n));
}

void magnitude_histogram(const float* d_v, size_t n, uint32_t shift, uint32_t bits, uint32_t prefix,
                         uint32_t prefix_bits, uint64_t* h_hist, void* d_work, size_t work_bytes, int device,
                         void* stream, bool warp_aggregated) {
  (void)prefix_bits;  // implied by shift + bits: keys are 31-bit
  // topk_workspace_bytes sizes the bins for at most this many bits.
  if (bits > kTopKMaxHistogramBits)
    throw CudaFailure("magnitude_histogram: " + std::to_string(bits) + " bits (at most " +
                      std::to_string(kTopKMaxHistogramBits) + ")");
  const size_t bins = size_t(1) << bits;
  require_work("magnitude_histogram", d_work, work_bytes, histogram_work_bytes(bits));
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  auto* hist = static_cast<unsigned long long*>(d_work);
  check(cudaMemsetAsync(hist, 0, bins * sizeof(unsigned long long), s), "cudaMemsetAsync", device);
  if (n > 0) {
    const auto kernel = warp_aggregated ? histogram_aggregated_kernel : histogram_kernel;
    kernel<<<grid_for(n), kThreads, bins * sizeof(uint32_t), s>>>(d_v, n, shift, bits, prefix, hist);
    check_launch("topk histogram kernel", device);
  }
  static_assert(sizeof(uint64_t) == sizeof(unsigned long long));
  check(cudaMemcpyAsync(h_hist, hist, bins * sizeof(uint64_t), cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync",
        device);
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
}

void topk_compact(const float* d_v, float* d_clear, size_t n, uint32_t threshold, uint64_t ties, uint32_t* d_idx,
                  float* d_val, uint64_t k, void* d_work, size_t work_bytes, int device, void* stream,
                  bool device_scan) {
  if (n == 0) return;
  require_work("topk_compact", d_work, work_bytes, compact_work_bytes(n));
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  const size_t tiles = tiles_for(n);
  uint32_t* d_gt = static_cast<uint32_t*>(d_work);
  uint32_t* d_eq = d_gt + tiles;
  auto* d_before =
      reinterpret_cast<unsigned long long*>(static_cast<char*>(d_work) + compact_counts_bytes(tiles));
  unsigned long long* d_totals = d_before + 2 * tiles;
  // g keys above the threshold and e equal to it must make k (the host scan checks before the
  // write kernel, the device scan's write kernel writes nothing otherwise and is checked after).
  const auto require_makes_k = [&](unsigned long long g, unsigned long long e) {
    if (g + (e < ties ? e : ties) != k)
      throw CudaFailure("topk_compact: " + std::to_string(g) + " keys above the threshold and " + std::to_string(e) +
                        " equal to it cannot make k = " + std::to_string(k));
  };
  tile_count_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, s>>>(d_v, n, threshold, d_gt, d_eq);
  check_launch("topk tile count kernel", device);
  if (device_scan) {
    tile_scan_kernel<<<1, kScanThreads, 0, s>>>(d_gt, d_eq, tiles, d_before, d_totals);
    check_launch("topk tile scan kernel", device);
  } else {
    std::vector<uint32_t> gt(tiles), eq(tiles);
    check(cudaMemcpyAsync(gt.data(), d_gt, tiles * 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync", device);
    check(cudaMemcpyAsync(eq.data(), d_eq, tiles * 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync", device);
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
    std::vector<unsigned long long> before(2 * tiles);
    unsigned long long g = 0, e = 0;
    for (size_t t = 0; t < tiles; ++t) {
      before[t] = g;
      before[tiles + t] = e;
      g += gt[t];
      e += eq[t];
    }
    require_makes_k(g, e);
    check(cudaMemcpyAsync(d_before, before.data(), 2 * tiles * sizeof(unsigned long long), cudaMemcpyHostToDevice,
                          s),
          "cudaMemcpyAsync", device);
  }
  tile_write_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, s>>>(
      d_v, d_clear, n, threshold, ties, d_before, d_before + tiles, d_idx, d_val, k, device_scan ? d_totals : nullptr);
  check_launch("topk tile write kernel", device);
  unsigned long long totals[2] = {0, 0};
  if (device_scan)
    check(cudaMemcpyAsync(totals, d_totals, sizeof totals, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync", device);
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
  if (device_scan) require_makes_k(totals[0], totals[1]);
}

void scatter_add(const uint32_t* d_idx, const float* d_val, uint64_t k, float* d_out, int device, void* stream) {
  if (k == 0) return;
  DeviceGuard guard(device);
  scatter_add_kernel<<<grid_for(k), kThreads, 0, as_stream(stream)>>>(d_idx, d_val, k, d_out);
  check_launch("topk scatter-add kernel", device);
}

}  // namespace meshtrain::cuda::compress
