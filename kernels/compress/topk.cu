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
#include <cub/device/device_radix_sort.cuh>

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
// copy to the host and back between the two compaction kernels. eq may be null (counted as 0):
// the sampled selection has one count per tile.
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
    const unsigned long long g = t < tiles ? gt[t] : 0, e = eq != nullptr && t < tiles ? eq[t] : 0;
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

// ---- the selection bracketed by a sample (api.h topk_select_sampled).
//
// The count and write passes share the tiles of the compaction (kTile elements, one block of
// kThreads each): warp w of a block owns kTileChunks * 32 consecutive elements of its tile, and
// reads them 32 at a time (lane l takes element l of each row), all loads first.
constexpr unsigned kWarpSpan = kTileChunks * 32;
static_assert(kTile == size_t(kThreads / 32) * kWarpSpan, "a tile is its warps' spans");

// The threshold the write pass applies: key > key_above, or key == key_above and i < cutoff.
struct SampledThreshold {
  uint32_t key;
  uint32_t unused;
  unsigned long long cutoff;  // one past the last index sent with key == `key` (0: none)
};

__device__ __forceinline__ void load_warp_span(const float* v, size_t n, size_t span_begin, unsigned lane,
                                               float (&x)[kTileChunks]) {
#pragma unroll
  for (unsigned r = 0; r < kTileChunks; ++r) {
    const size_t i = span_begin + size_t(r) * 32 + lane;
    x[r] = i < n ? v[i] : 0.0f;
  }
}

// The offset of this warp's first element among its tile's selected (or gathered) elements, and
// the tile's total, from each warp's count (one barrier pair).
__device__ __forceinline__ uint32_t warps_before(uint32_t count, unsigned warp, uint32_t* shared_counts,
                                                 uint32_t& tile_total) {
  if ((threadIdx.x & 31) == 0) shared_counts[warp] = count;
  __syncthreads();
  uint32_t before = 0, total = 0;
  for (unsigned w = 0; w < kThreads / 32; ++w) {
    if (w < warp) before += shared_counts[w];
    total += shared_counts[w];
  }
  tile_total = total;
  __syncthreads();  // shared_counts may be reused by the caller
  return before;
}

__global__ void sample_keys_kernel(const float* v, unsigned long long n, unsigned long long samples,
                                   uint32_t* keys) {
  const size_t s = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < samples) keys[s] = math::magnitude_key(v[math::topk_sample_index(s, n, samples)]);
}

// Per tile: above_tile[t] = keys > hi. Gathers the keys in [lo, hi] as (~key << 32 | i), which
// sort ascending as (key descending, index ascending); counters[0] += above, counters[1] +=
// gathered (one atomic of each per block), entries past `capacity` are counted, not written;
// counters[2] and [3] = lo and hi, for the host. lo / hi null: open ends (0 and above every key).
// 64 registers (4 blocks of kThreads per SM) keep enough of the span's loads in flight.
__global__ void __launch_bounds__(kThreads, 4)
    sampled_count_kernel(const float* v, size_t n, const uint32_t* lo_key, const uint32_t* hi_key,
                         uint32_t* above_tile, unsigned long long* counters, unsigned long long* gathered,
                         unsigned long long capacity) {
  __shared__ uint32_t counts[kThreads / 32];
  __shared__ unsigned long long block_base;
  const uint32_t lo = lo_key != nullptr ? *lo_key : 0u, hi = hi_key != nullptr ? *hi_key : 0xffffffffu;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    counters[2] = lo;
    counters[3] = hi;
  }
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  const size_t span_begin = size_t(blockIdx.x) * kTile + size_t(warp) * kWarpSpan;
  float x[kTileChunks];
  load_warp_span(v, n, span_begin, lane, x);
  uint32_t above = 0, in_bracket = 0;
  unsigned masks[kTileChunks];
#pragma unroll
  for (unsigned r = 0; r < kTileChunks; ++r) {
    const bool valid = span_begin + size_t(r) * 32 + lane < n;
    const uint32_t key = math::magnitude_key(x[r]);
    above += __popc(__ballot_sync(0xffffffffu, valid && key > hi));
    masks[r] = __ballot_sync(0xffffffffu, valid && key >= lo && key <= hi);
    in_bracket += __popc(masks[r]);
  }
  uint32_t tile_above = 0, tile_gathered = 0;
  (void)warps_before(above, warp, counts, tile_above);
  const uint32_t gathered_before = warps_before(in_bracket, warp, counts, tile_gathered);
  if (threadIdx.x == 0) {
    above_tile[blockIdx.x] = tile_above;
    if (tile_above != 0) atomicAdd(&counters[0], static_cast<unsigned long long>(tile_above));
    block_base = tile_gathered != 0 ? atomicAdd(&counters[1], static_cast<unsigned long long>(tile_gathered)) : 0;
  }
  __syncthreads();
  if (in_bracket == 0) return;
  unsigned long long slot = block_base + gathered_before;
#pragma unroll
  for (unsigned r = 0; r < kTileChunks; ++r) {
    if ((masks[r] >> lane) & 1u) {
      const unsigned long long at = slot + __popc(masks[r] & lanes_below);
      const uint32_t key = math::magnitude_key(x[r]);
      if (at < capacity)
        gathered[at] = (static_cast<unsigned long long>(~key) << 32) | (span_begin + size_t(r) * 32 + lane);
    }
    slot += __popc(masks[r]);
  }
}

// The first `taken` sorted candidates are sent: each adds one to its tile's count, and the last
// of them sets the threshold (none taken: everything above hi, exactly k, is sent).
__global__ void sampled_take_kernel(const unsigned long long* sorted, unsigned long long taken, const uint32_t* hi_key,
                                    uint32_t* tile_counts, SampledThreshold* threshold) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t j = size_t(blockIdx.x) * blockDim.x + threadIdx.x; j < taken; j += stride)
    atomicAdd(&tile_counts[static_cast<uint32_t>(sorted[j]) / kTile], 1u);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (taken > 0) {
      const unsigned long long last = sorted[taken - 1];
      threshold->key = ~static_cast<uint32_t>(last >> 32);
      threshold->cutoff = (last & 0xffffffffull) + 1;
    } else {
      threshold->key = hi_key != nullptr ? *hi_key : 0xffffffffu;
      threshold->cutoff = 0;
    }
  }
}

// Writes the selected elements of each tile in index order at the tile's prefix (tile_scan_kernel
// over the counts); nothing when the counts do not make k (the host reports it).
__global__ void __launch_bounds__(kThreads, 4)
    sampled_write_kernel(const float* v, float* clear, size_t n, const SampledThreshold* threshold,
                         const unsigned long long* tile_before, const unsigned long long* totals,
                         unsigned long long k, uint32_t* idx, float* val) {
  __shared__ uint32_t counts[kThreads / 32];
  if (totals[0] != k) return;
  const uint32_t t_key = threshold->key;
  const unsigned long long cutoff = threshold->cutoff;
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  const size_t span_begin = size_t(blockIdx.x) * kTile + size_t(warp) * kWarpSpan;
  float x[kTileChunks];
  load_warp_span(v, n, span_begin, lane, x);
  unsigned masks[kTileChunks];
  uint32_t selected = 0;
#pragma unroll
  for (unsigned r = 0; r < kTileChunks; ++r) {
    const size_t i = span_begin + size_t(r) * 32 + lane;
    const uint32_t key = math::magnitude_key(x[r]);
    masks[r] = __ballot_sync(0xffffffffu, i < n && (key > t_key || (key == t_key && i < cutoff)));
    selected += __popc(masks[r]);
  }
  uint32_t tile_total = 0;
  unsigned long long pos = tile_before[blockIdx.x] + warps_before(selected, warp, counts, tile_total);
  if (selected == 0) return;
#pragma unroll
  for (unsigned r = 0; r < kTileChunks; ++r) {
    if ((masks[r] >> lane) & 1u) {
      const size_t i = span_begin + size_t(r) * 32 + lane;
      const unsigned long long at = pos + __popc(masks[r] & lanes_below);
      if (at < k) {
        idx[at] = static_cast<uint32_t>(i);
        val[at] = x[r];
      }
      if (clear) clear[i] = 0.0f;
    }
    pos += __popc(masks[r]);
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

void require_work(const char* what, const void* d_work, size_t work_bytes, size_t needed,
                  const char* sized_by = "topk_workspace_bytes") {
  if (needed == 0 || (d_work != nullptr && work_bytes >= needed)) return;
  throw CudaFailure(std::string(what) + ": workspace of " + std::to_string(work_bytes) + " bytes" +
                    (d_work == nullptr ? " (null)" : "") + ", needs " + std::to_string(needed) + " (" + sized_by +
                    ")");
}

// topk_select_sampled's workspace, in this order (each region aligned): four counters (above,
// gathered, lo, hi) and the threshold; the sample and its sort's second buffer; the gathered
// candidates and theirs; the tiles' counts, their prefixes and totals (tile_scan_kernel's
// layout); the sorts' storage. At least topk_compact's workspace (the single-key bracket's path).
constexpr size_t kSampledCounters = 4;
struct SampledLayout {
  TopKSamplePlan plan;
  size_t tiles = 0;
  size_t sample = 0, sample_alt = 0, gathered = 0, gathered_alt = 0, tile_counts = 0, before = 0, sort = 0;
  size_t sort_bytes = 0, total = 0;
};

// The device sorts' temporary storage (CUB asks the current device). The double-buffer sorts
// ping-pong between the two buffers given, so the storage holds no third copy of the keys.
size_t sort_storage_bytes(uint64_t samples, uint64_t capacity, int device) {
  size_t for_sample = 0, for_gathered = 0;
  cub::DoubleBuffer<uint32_t> sample_keys(nullptr, nullptr);
  cub::DoubleBuffer<unsigned long long> gathered_keys(nullptr, nullptr);
  check(cub::DeviceRadixSort::SortKeys(nullptr, for_sample, sample_keys, static_cast<int>(samples), 0, 31),
        "cub::DeviceRadixSort (storage for the sample)", device);
  check(cub::DeviceRadixSort::SortKeys(nullptr, for_gathered, gathered_keys, static_cast<int>(capacity), 0, 64),
        "cub::DeviceRadixSort (storage for the candidates)", device);
  return std::max(for_sample, for_gathered);
}

SampledLayout sampled_layout(size_t n, uint64_t k, int device) {
  // Candidates carry their index in 32 bits, and the tiles are found from it.
  if (n > UINT32_MAX)
    throw CudaFailure("topk_select_sampled: " + std::to_string(n) + " elements (indices are 32-bit: at most " +
                      std::to_string(UINT32_MAX) + ")");
  SampledLayout l;
  l.plan = topk_sample_plan(n, k);
  if (l.plan.samples > uint64_t(INT32_MAX) || l.plan.capacity > uint64_t(INT32_MAX))
    throw CudaFailure("topk_select_sampled: " + std::to_string(l.plan.capacity) + " candidates for " +
                      std::to_string(n) + " elements (at most 2^31 - 1)");
  l.tiles = tiles_for(n);
  size_t at = work_align(kSampledCounters * sizeof(unsigned long long) + sizeof(SampledThreshold));
  auto region = [&](size_t bytes) {
    const size_t begin = at;
    at += work_align(bytes);
    return begin;
  };
  l.sample = region(l.plan.samples * sizeof(uint32_t));
  l.sample_alt = region(l.plan.samples * sizeof(uint32_t));
  l.gathered = region(l.plan.capacity * sizeof(unsigned long long));
  l.gathered_alt = region(l.plan.capacity * sizeof(unsigned long long));
  l.tile_counts = region(l.tiles * sizeof(uint32_t));
  l.before = region((2 * l.tiles + 2) * sizeof(unsigned long long));
  DeviceGuard guard(device);
  l.sort_bytes = sort_storage_bytes(l.plan.samples, l.plan.capacity, device);
  l.sort = region(l.sort_bytes);
  l.total = std::max(at, compact_work_bytes(n));
  return l;
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

size_t topk_sampled_workspace_bytes(size_t n, uint64_t k, int device) {
  if (n == 0 || k == 0 || k > n) return 0;
  return sampled_layout(n, k, device).total;
}

bool topk_select_sampled(const float* d_v, float* d_clear, size_t n, uint64_t k, uint32_t* d_idx, float* d_val,
                         void* d_work, size_t work_bytes, int device, void* stream, uint64_t* candidates) {
  if (k == 0 || k > n)
    throw CudaFailure("topk_select_sampled: k = " + std::to_string(k) + " of " + std::to_string(n) +
                      " elements (1 <= k <= n)");
  const SampledLayout l = sampled_layout(n, k, device);
  require_work("topk_select_sampled", d_work, work_bytes, l.total, "topk_sampled_workspace_bytes");
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  char* base = static_cast<char*>(d_work);
  auto* counters = reinterpret_cast<unsigned long long*>(base);
  auto* threshold = reinterpret_cast<SampledThreshold*>(counters + kSampledCounters);
  auto* tile_counts = reinterpret_cast<uint32_t*>(base + l.tile_counts);
  auto* before = reinterpret_cast<unsigned long long*>(base + l.before);
  void* sort_storage = base + l.sort;
  const unsigned tiles = static_cast<unsigned>(l.tiles);

  check(cudaMemsetAsync(counters, 0, 2 * sizeof(unsigned long long), s), "cudaMemsetAsync", device);
  cub::DoubleBuffer<uint32_t> sample(reinterpret_cast<uint32_t*>(base + l.sample),
                                     reinterpret_cast<uint32_t*>(base + l.sample_alt));
  sample_keys_kernel<<<static_cast<unsigned>((l.plan.samples + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      d_v, n, l.plan.samples, sample.Current());
  check_launch("topk sample kernel", device);
  size_t sort_bytes = l.sort_bytes;  // each sort gets the whole storage (CUB takes the size by reference)
  check(cub::DeviceRadixSort::SortKeys(sort_storage, sort_bytes, sample, static_cast<int>(l.plan.samples), 0, 31, s),
        "cub::DeviceRadixSort (the sample)", device);
  const uint32_t* sorted_sample = sample.Current();  // which buffer holds the result is known on return
  const uint32_t* lo = l.plan.lo_open ? nullptr : sorted_sample + l.plan.lo_rank;
  const uint32_t* hi = l.plan.hi_open ? nullptr : sorted_sample + l.plan.hi_rank;
  cub::DoubleBuffer<unsigned long long> gathered(reinterpret_cast<unsigned long long*>(base + l.gathered),
                                                 reinterpret_cast<unsigned long long*>(base + l.gathered_alt));
  sampled_count_kernel<<<tiles, kThreads, 0, s>>>(d_v, n, lo, hi, tile_counts, counters, gathered.Current(),
                                                  l.plan.capacity);
  check_launch("topk sampled count kernel", device);
  unsigned long long counted[kSampledCounters] = {};  // above hi, in [lo, hi], lo, hi
  check(cudaMemcpyAsync(counted, counters, sizeof counted, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync", device);
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
  if (candidates != nullptr) *candidates = counted[1];
  const unsigned long long above = counted[0], in_bracket = counted[1];
  if (above > k || above + in_bracket < k) return false;  // the k-th largest key is outside [lo, hi]
  if (in_bracket > l.plan.capacity) {
    // Too many to sort. When the bracket is a single key (ties: zeros of a sparse gradient,
    // quantised values) that key is the threshold, and the compaction takes k - above of them.
    if (counted[2] != counted[3]) return false;
    topk_compact(d_v, d_clear, n, static_cast<uint32_t>(counted[3]), k - above, d_idx, d_val, k, d_work, work_bytes,
                 device, stream);
    return true;
  }

  const unsigned long long taken = k - above;
  sort_bytes = l.sort_bytes;
  if (taken > 0)
    check(cub::DeviceRadixSort::SortKeys(sort_storage, sort_bytes, gathered, static_cast<int>(in_bracket), 0, 64, s),
          "cub::DeviceRadixSort (the candidates)", device);
  sampled_take_kernel<<<grid_for(taken), kThreads, 0, s>>>(gathered.Current(), taken, hi, tile_counts, threshold);
  check_launch("topk sampled take kernel", device);
  unsigned long long* totals = before + 2 * l.tiles;
  tile_scan_kernel<<<1, kScanThreads, 0, s>>>(tile_counts, nullptr, l.tiles, before, totals);
  check_launch("topk tile scan kernel", device);
  sampled_write_kernel<<<tiles, kThreads, 0, s>>>(d_v, d_clear, n, threshold, before, totals, k, d_idx, d_val);
  check_launch("topk sampled write kernel", device);
  unsigned long long sent = 0;
  check(cudaMemcpyAsync(&sent, totals, sizeof sent, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync", device);
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
  if (sent != k)
    throw CudaFailure("topk_select_sampled: the tiles hold " + std::to_string(sent) + " selected elements, not k = " +
                      std::to_string(k) + " (nothing written)");
  return true;
}

void scatter_add(const uint32_t* d_idx, const float* d_val, uint64_t k, float* d_out, int device, void* stream) {
  if (k == 0) return;
  DeviceGuard guard(device);
  scatter_add_kernel<<<grid_for(k), kThreads, 0, as_stream(stream)>>>(d_idx, d_val, k, d_out);
  check_launch("topk scatter-add kernel", device);
}

}  // namespace meshtrain::cuda::compress
