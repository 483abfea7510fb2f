// kernels/compress/api.h's top-k functions: launches, workspaces and the host's part of the
// selections. The kernels, and what they compute, are in topk_kernels.cuh.
#include <cub/device/device_radix_sort.cuh>

#include <vector>

#include "cuda_util.cuh"
#include "topk_kernels.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;

namespace {

// The caller's workspace (topk_workspace_bytes). magnitude_histogram: the 2^bits 64-bit bins.
// topk_compact: the per-tile counts (gt then eq, 32-bit), then at an aligned offset their
// exclusive prefixes (gt then eq, 64-bit), then the two totals (device_scan): separate regions,
// so that the upload of the prefixes never lands on counts that a copy to the host may still
// be reading.
constexpr size_t kWorkAlign = 256;

size_t work_align(size_t bytes) { return (bytes + kWorkAlign - 1) / kWorkAlign * kWorkAlign; }
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
    MT_LAUNCH(kernel, grid_for(n), kThreads, bins * sizeof(uint32_t), s)(d_v, n, shift, bits, prefix, hist);
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
  MT_LAUNCH(tile_count_kernel, static_cast<unsigned>(tiles), kThreads, 0, s)(d_v, n, threshold, d_gt, d_eq);
  check_launch("topk tile count kernel", device);
  if (device_scan) {
    MT_LAUNCH(tile_scan_kernel, 1, kScanThreads, 0, s)(d_gt, d_eq, tiles, d_before, d_totals);
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
  MT_LAUNCH(tile_write_kernel, static_cast<unsigned>(tiles), kThreads, 0, s)(
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
  MT_LAUNCH(sample_keys_kernel, blocks_covering(l.plan.samples), kThreads, 0, s)(
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
  MT_LAUNCH(sampled_count_kernel, tiles, kThreads, 0, s)(d_v, n, lo, hi, tile_counts, counters, gathered.Current(),
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
  MT_LAUNCH(sampled_take_kernel, grid_for(taken), kThreads, 0, s)(gathered.Current(), taken, hi, tile_counts,
                                                                  threshold);
  check_launch("topk sampled take kernel", device);
  unsigned long long* totals = before + 2 * l.tiles;
  MT_LAUNCH(tile_scan_kernel, 1, kScanThreads, 0, s)(tile_counts, nullptr, l.tiles, before, totals);
  check_launch("topk tile scan kernel", device);
  MT_LAUNCH(sampled_write_kernel, tiles, kThreads, 0, s)(d_v, d_clear, n, threshold, before, totals, k, d_idx, d_val);
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
  MT_LAUNCH(scatter_add_kernel, grid_for(k), kThreads, 0, as_stream(stream))(d_idx, d_val, k, d_out);
  check_launch("topk scatter-add kernel", device);
}

}  // namespace meshtrain::cuda::compress
