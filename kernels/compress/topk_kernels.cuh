// The top-k kernels behind kernels/compress/api.h, launched by topk.cu: magnitude histograms for
// the host's radix select (lib/compress/topk.cpp), the order-preserving compaction, the selection
// bracketed by a sample, and the scatter-add of sparse payloads.
//
// Compaction: tiles of kTile elements. A count pass gives each tile its number of keys above
// the threshold (gt) and equal to it (eq); the host turns those into exclusive prefixes (or,
// with device_scan, one block of the device does: a candidate not yet run on a GPU); the
// write pass walks each tile in index order, 256 elements at a time, ranking them with warp
// ballots. Element i is sent when key > T, or key == T and fewer than `ties` equal keys come
// before it; it goes to position gt_before(i) + min(eq_before(i), ties), so the output is in
// index order and equals the CPU's.
//
// Included by topk.cu (after cuda_util.cuh) and by tests/compress/topk_kernels_sim_test.cpp,
// which runs these kernels on the CPU through tests/support/cuda_sim.h (its own CUDA
// built-ins): keep them to the built-ins that file provides.
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec_math.h"
#include "launch_shape.h"

namespace meshtrain::cuda::compress {
namespace {

namespace math = meshtrain::compress::math;
using detail::kThreads;

#ifndef MESHTRAIN_CUDA_SIM
// The block's dynamic shared memory (the launch's third parameter), as 32-bit words.
__device__ __forceinline__ uint32_t* dynamic_shared_words() {
  extern __shared__ uint32_t words[];
  return words;
}
#endif

constexpr unsigned kTileChunks = 16;
constexpr size_t kTile = size_t(kThreads) * kTileChunks;
inline size_t tiles_for(size_t n) { return (n + kTile - 1) / kTile; }

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
  uint32_t* local = dynamic_shared_words();
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
  uint32_t* local = dynamic_shared_words();
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

// One block of kScanThreads (1024): the bound keeps its registers within what such a block may use.
__global__ void __launch_bounds__(kScanThreads)
    tile_scan_kernel(const uint32_t* gt, const uint32_t* eq, size_t tiles, unsigned long long* before,
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

// The threshold the write pass applies: a key above `key`, or equal to it with i < cutoff.
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

__global__ void scatter_add_kernel(const uint32_t* idx, const float* val, unsigned long long k, float* out) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t j = size_t(blockIdx.x) * blockDim.x + threadIdx.x; j < k; j += stride)
    out[idx[j]] = math::add_rn(out[idx[j]], val[j]);
}

}  // namespace
}  // namespace meshtrain::cuda::compress
