// meshtrain-bench-compress: one JSON record per codec, operation and device, for
// docs/benchmarks.md. Each operation's time is the median of --repeats runs, and each run is
// preceded by a memcpy of the same fp32 bytes (a device-to-device copy on the GPU), whose
// median is the record's baseline: both are measured in the same run, under the same load.
//
//   meshtrain-bench-compress [--bytes 67108864] [--repeats 7] [--device cpu|cuda|all]
//                            [--codec SPEC]...   (only these codec cases; repeatable)
//
// Record: {"codec", "op" (encode | decode | decode_accumulate), "bytes" (fp32 gradient bytes),
// "payload_bytes", "median_ms", "GBps" (bytes / median time, 1e9 bytes/s), "memcpy_GBps",
// "ratio_vs_memcpy", "device", "repeats"}. Without a GPU, --device cuda prints one record
// {"device": "cuda", "skipped": "<the CUDA runtime's reason>"} and exits 0.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>

#include "benchmarks/compress/cases.h"
#include "kernels/compress/api.h"
#include "kernels/compress/codec_math.h"
#include "kernels/runtime.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::bench;
namespace kc = meshtrain::cuda::compress;

namespace {

using Clock = std::chrono::steady_clock;

template <typename F>
double seconds(F&& f) {
  auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {  // control characters (an error message's newline)
      char u[8];
      std::snprintf(u, sizeof u, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += u;
    } else {
      out += c;
    }
  }
  return out;
}

void print_record(const std::string& codec, const std::string& op, size_t bytes, size_t payload_bytes,
                  double t, double t_copy, const std::string& device, int repeats) {
  const double gbps = bytes / t / 1e9, copy_gbps = bytes / t_copy / 1e9;
  std::printf(
      "{\"codec\": \"%s\", \"op\": \"%s\", \"bytes\": %zu, \"payload_bytes\": %zu, \"median_ms\": %.3f, "
      "\"GBps\": %.3f, \"memcpy_GBps\": %.3f, \"ratio_vs_memcpy\": %.3f, \"device\": \"%s\", \"repeats\": %d}\n",
      json_escape(codec).c_str(), op.c_str(), bytes, payload_bytes, t * 1e3, gbps, copy_gbps, gbps / copy_gbps,
      json_escape(device).c_str(), repeats);
  std::fflush(stdout);
}

// A record for a measurement that failed (a CUDA error, a codec's exception): the run goes on,
// so one failing path does not lose the others' figures, and exits 1 at the end.
int failures = 0;
void print_failure(const std::string& codec, const std::string& op, const std::string& device, const char* what) {
  ++failures;
  std::fprintf(stderr, "meshtrain-bench-compress: %s %s: %s\n", codec.c_str(), op.c_str(), what);
  std::printf("{\"codec\": \"%s\", \"op\": \"%s\", \"error\": \"%s\", \"device\": \"%s\"}\n",
              json_escape(codec).c_str(), op.c_str(), json_escape(what).c_str(), json_escape(device).c_str());
  std::fflush(stdout);
}
template <typename F>
void guarded(const std::string& codec, const std::string& op, const std::string& device, F&& measure) {
  try {
    measure();
  } catch (const std::exception& e) {
    print_failure(codec, op, device, e.what());
  }
}

const char* kOps[] = {"encode", "decode", "decode_accumulate"};

// The codec cases to run: all, or those named with --codec.
std::vector<CodecCase> selected_cases(const std::vector<std::string>& only) {
  std::vector<CodecCase> cases;
  for (const auto& c : codec_cases())
    if (only.empty() || std::find(only.begin(), only.end(), c.spec) != only.end()) cases.push_back(c);
  for (const auto& name : only)
    if (std::none_of(cases.begin(), cases.end(), [&](const CodecCase& c) { return c.spec == name; }))
      cases.push_back({name});  // any make_codec spec; a bad one fails with make_codec's error
  return cases;
}

void run_cpu(size_t bytes, int repeats, const std::vector<CodecCase>& cases) {
  const size_t count = bytes / 4;
  auto grad = gradient(count);
  std::vector<float> copy(count), out(count);
  prefault(copy);
  prefault(out);
  const std::string device =
      "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " hardware threads, 1 used)";
  for (const auto& c : cases) guarded(c.spec, "setup", device, [&] {
    auto codec = make_codec(c.spec);
    TensorSpec spec = spec_for(c.spec, count);
    auto state = codec->make_state(spec);
    std::vector<uint8_t> payload(codec->encoded_bytes(spec));
    prefault(payload);
    BufferView g{grad.data(), count, DType::Float32};
    BufferView o{out.data(), count, DType::Float32};
    codec->encode(g, *state, payload);  // warm-up: first touch, and a steady-state residual
    for (const char* op : kOps) guarded(c.spec, op, device, [&] {
      std::vector<double> times, copies;
      for (int r = 0; r < repeats; ++r) {
        copies.push_back(seconds([&] { std::memcpy(copy.data(), grad.data(), bytes); }));
        times.push_back(seconds([&] {
          if (op == kOps[0]) codec->encode(g, *state, payload);
          else if (op == kOps[1]) codec->decode(payload, o);
          else codec->decode_accumulate(payload, o);
        }));
      }
      print_record(c.spec, op, count * 4, payload.size(), median(times), median(copies), device, repeats);
    });
  });
}

void run_cuda(size_t bytes, int repeats, const std::vector<CodecCase>& cases) {
  if (cuda::device_count() == 0) {
    std::printf("{\"device\": \"cuda\", \"skipped\": \"no CUDA device: %s\"}\n",
                json_escape(cuda::runtime_description()).c_str());
    return;
  }
  const size_t count = bytes / 4;
  auto host = gradient(count);
  void* s = kc::stream_create(0);
  kc::DeviceBuffer x(bytes, 0), y(bytes, 0), o(bytes, 0);
  kc::copy_async(x.data(), host.data(), bytes, 0, s);
  kc::synchronize(0, s);
  const std::string device = "cuda:0 (" + cuda::runtime_description() + ")";
  auto d2d = [&] {
    return seconds([&] {
      kc::copy_async(y.data(), x.data(), bytes, 0, s);
      kc::synchronize(0, s);
    });
  };
  // Kernels alone, on device buffers: what the 80%-of-copy target is about.
  {
    kc::DeviceBuffer r(bytes, 0), q(bytes, 0), scales((count / 256 + 1) * 4, 0);
    struct K {
      const char* codec;
      const char* op;
      size_t payload;
      std::function<void()> run;
    };
    std::vector<K> kernels = {
        {"fp16", "encode_kernel", count * 2, [&] { kc::fp32_to_fp16(x.as<float>(), q.as<uint16_t>(), count, 0, s); }},
        {"fp16", "decode_kernel", count * 2, [&] { kc::fp16_to_fp32(q.as<uint16_t>(), o.as<float>(), count, false, 0, s); }},
        {"bf16", "encode_kernel", count * 2, [&] { kc::fp32_to_bf16(x.as<float>(), q.as<uint16_t>(), count, 0, s); }},
        {"bf16", "decode_kernel", count * 2, [&] { kc::bf16_to_fp32(q.as<uint16_t>(), o.as<float>(), count, false, 0, s); }},
        {"int8", "encode_kernel", count + count / 64,
         [&] { kc::int8_quantize(x.as<float>(), r.as<float>(), count, 256, false, 0, 0, q.as<int8_t>(), scales.as<float>(), 0, s); }},
        // Without error feedback: 5 bytes per element against the copy's 8, as fp16's 6; with it
        // (above) 13, so that record's ratio cannot pass 8/13 = 0.62 (docs/compression.md).
        {"int8:error_feedback=off", "encode_kernel", count + count / 64,
         [&] { kc::int8_quantize(x.as<float>(), nullptr, count, 256, false, 0, 0, q.as<int8_t>(), scales.as<float>(), 0, s); }},
        {"int8", "decode_kernel", count + count / 64,
         [&] { kc::int8_dequantize(q.as<int8_t>(), scales.as<float>(), count, 256, o.as<float>(), false, 0, s); }},
        {"int8", "decode_accumulate_kernel", count + count / 64,
         [&] { kc::int8_dequantize(q.as<int8_t>(), scales.as<float>(), count, 256, o.as<float>(), true, 0, s); }},
    };
    for (auto& k : kernels) guarded(k.codec, k.op, device, [&] {
      k.run();
      kc::synchronize(0, s);
      std::vector<double> times, copies;
      for (int i = 0; i < repeats; ++i) {
        copies.push_back(d2d());
        times.push_back(seconds([&] {
          k.run();
          kc::synchronize(0, s);
        }));
      }
      print_record(k.codec, k.op, bytes, k.payload, median(times), median(copies), device, repeats);
    });
  }
  // Top-k of 1% by phases, as the codec's encode without error feedback runs them (radix passes
  // of 11, 11 and 9 bits: lib/compress/topk.cpp), on device buffers: where its time goes, and
  // the selection alone (select_kernel: indices and values on the device, as torch.topk leaves
  // them) beside the whole encode, which also copies the payload to host memory.
  {
    const uint64_t k = static_cast<uint64_t>(std::ceil(0.01 * static_cast<double>(count)));
    std::vector<uint32_t> keys(count);
    for (size_t i = 0; i < count; ++i) keys[i] = meshtrain::compress::math::magnitude_key(host[i]);
    std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(k - 1), keys.end(), std::greater<>());
    const uint32_t threshold = keys[k - 1];
    // Of the k, those equal to the threshold (counting the keys above it is blind to nth_element's order).
    const auto above = std::count_if(keys.begin(), keys.end(), [&](uint32_t key) { return key > threshold; });
    const uint64_t ties = k - static_cast<uint64_t>(above);
    kc::DeviceBuffer work(kc::topk_workspace_bytes(count), 0), out(8 * k, 0);
    std::vector<uint64_t> hist(size_t(1) << kc::kTopKMaxHistogramBits);
    std::vector<uint8_t> payload(8 * k);
    prefault(payload);
    const float* v = x.as<float>();
    auto pass = [&](uint32_t shift, uint32_t bits, bool aggregated = false) {
      kc::magnitude_histogram(v, count, shift, bits, threshold >> (shift + bits), 31 - shift - bits, hist.data(),
                              work.data(), work.bytes(), 0, s, aggregated);
    };
    auto compact = [&](bool device_scan = false) {
      kc::topk_compact(v, nullptr, count, threshold, ties, out.as<uint32_t>(),
                       reinterpret_cast<float*>(out.as<uint32_t>() + k), k, work.data(), work.bytes(), 0, s,
                       device_scan);
    };
    // The selection bracketed by a sample (selection=sampled): whether its bracket held on this
    // data and how many candidates it gathered are printed after the phases.
    kc::DeviceBuffer sampled_work;  // allocated by the first (untimed) call
    bool sampled_hit = false;
    uint64_t sampled_candidates = 0;
    auto sampled = [&] {
      if (sampled_work.bytes() == 0) sampled_work = kc::DeviceBuffer(kc::topk_sampled_workspace_bytes(count, k, 0), 0);
      sampled_hit = kc::topk_select_sampled(v, nullptr, count, k, out.as<uint32_t>(),
                                            reinterpret_cast<float*>(out.as<uint32_t>() + k), sampled_work.data(),
                                            sampled_work.bytes(), 0, s, &sampled_candidates);
    };
    auto select = [&](bool next) {  // the radix select's three passes, then the compaction
      pass(20, 11, next);
      pass(9, 11, next);
      pass(0, 9, next);
      compact(next);
    };
    struct Phase {
      const char* op;
      std::function<void()> run;
    };
    const std::vector<Phase> phases = {
        {"select_histogram_pass1", [&] { pass(20, 11); }},
        {"select_histogram_pass2", [&] { pass(9, 11); }},
        {"select_histogram_pass3", [&] { pass(0, 9); }},
        {"select_compact", [&] { compact(); }},
        {"select_kernel", [&] { select(false); }},
        // Candidates, not yet the codec's: warp-aggregated histograms and the compaction with the
        // tiles' prefixes summed on the device; select_kernel_next is the selection with both.
        {"select_histogram_pass1_aggregated", [&] { pass(20, 11, true); }},
        {"select_histogram_pass2_aggregated", [&] { pass(9, 11, true); }},
        {"select_histogram_pass3_aggregated", [&] { pass(0, 9, true); }},
        {"select_compact_device_scan", [&] { compact(true); }},
        {"select_kernel_next", [&] { select(true); }},
        {"payload_to_host", [&] {
           kc::copy_async(payload.data(), out.data(), 8 * k, 0, s);
           kc::synchronize(0, s);
         }},
        // Last: not yet run on a GPU, and a device fault would spoil every later measurement.
        {"select_sampled", sampled},
    };
    const std::string topk_codec = "topk:fraction=0.01,error_feedback=off";
    for (const auto& phase : phases) {
      guarded(topk_codec, phase.op, device, [&] {
        phase.run();
        std::vector<double> times, copies;
        for (int i = 0; i < repeats; ++i) {
          copies.push_back(d2d());
          times.push_back(seconds(phase.run));
        }
        print_record(topk_codec, phase.op, bytes, 8 * k, median(times), median(copies), device, repeats);
      });
    }
    guarded(topk_codec, "select_sampled_bracket", device, [&] {
      // The sampled selection's output against the radix select's compaction (both in index order),
      // each into an output filled with 0xff first; compared only when the bracket held.
      const std::vector<uint8_t> poison(8 * k, 0xff);
      auto selected = [&](const std::function<void()>& run) {
        kc::copy_async(out.data(), poison.data(), poison.size(), 0, s);
        run();
        std::vector<uint8_t> bytes_out(8 * k);
        kc::copy_async(bytes_out.data(), out.data(), bytes_out.size(), 0, s);
        kc::synchronize(0, s);
        return bytes_out;
      };
      const std::vector<uint8_t> by_radix = selected([&] { compact(); });
      const std::vector<uint8_t> by_sample = selected(sampled);
      const bool sampled_matches = sampled_hit && by_radix == by_sample;
      std::printf("{\"codec\": \"%s\", \"op\": \"select_sampled_bracket\", \"hit\": %s, \"matches_radix\": %s, "
                  "\"candidates\": %llu, \"k\": %llu, \"count\": %zu, \"device\": \"%s\"}\n",
                  json_escape(topk_codec).c_str(), sampled_hit ? "true" : "false", sampled_matches ? "true" : "false",
                  static_cast<unsigned long long>(sampled_candidates), static_cast<unsigned long long>(k), count,
                  json_escape(device).c_str());
      std::fflush(stdout);
    });
  }
  // Whole codec calls (kernels + the payload's copy to or from host memory + synchronisation),
  // with the payload in pageable memory (ops encode, decode, decode_accumulate) and in pinned
  // memory (the same ops + "_pinned"), as the compressed all-reduce keeps it for CUDA buffers.
  for (const auto& c : cases) guarded(c.spec, "setup", device, [&] {
    auto codec = make_codec(c.spec);
    TensorSpec spec = spec_for(c.spec, count);
    spec.device = DeviceKind::Cuda;
    auto state = codec->make_state(spec);
    const size_t payload_bytes = codec->encoded_bytes(spec);
    std::vector<uint8_t> pageable(payload_bytes);
    prefault(pageable);
    std::unique_ptr<uint8_t, void (*)(uint8_t*)> pinned(static_cast<uint8_t*>(kc::allocate_pinned(payload_bytes, 0)),
                                                        [](uint8_t* p) { kc::free_pinned(p); });
    if (!pinned) throw std::runtime_error("cudaHostAlloc refused " + std::to_string(payload_bytes) + " bytes");
    BufferView g{x.data(), count, DType::Float32, DeviceKind::Cuda, 0};
    BufferView out{o.data(), count, DType::Float32, DeviceKind::Cuda, 0};
    for (const bool pin : {false, true}) {
      const std::span<uint8_t> payload = pin ? std::span<uint8_t>(pinned.get(), payload_bytes) : std::span(pageable);
      codec->encode(g, *state, payload, CudaStream{s});
      for (const char* op : kOps) guarded(c.spec, op, device, [&] {
        std::vector<double> times, copies;
        for (int r = 0; r < repeats; ++r) {
          copies.push_back(d2d());
          times.push_back(seconds([&] {
            if (op == kOps[0]) codec->encode(g, *state, payload, CudaStream{s});
            else if (op == kOps[1]) codec->decode(payload, out, CudaStream{s});
            else codec->decode_accumulate(payload, out, CudaStream{s});
          }));
        }
        print_record(c.spec, pin ? std::string(op) + "_pinned" : op, bytes, payload_bytes, median(times),
                     median(copies), device, repeats);
      });
    }
  });
  kc::stream_destroy(s, 0);
}

}  // namespace

int main(int argc, char** argv) {
  size_t bytes = size_t(64) << 20;
  int repeats = 7;
  std::string device = "cpu";
  std::vector<std::string> only;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--bytes") bytes = std::stoull(value());
    else if (a == "--repeats") repeats = std::max(1, std::stoi(value()));
    else if (a == "--device") device = value();
    else if (a == "--codec") only.push_back(value());
    else {
      std::fprintf(stderr, "usage: %s [--bytes N] [--repeats N] [--device cpu|cuda|all] [--codec SPEC]...\n",
                   argv[0]);
      return 2;
    }
  }
  bytes = bytes / 4 * 4;
  try {
    const auto cases = selected_cases(only);
    if (device == "cpu" || device == "all") run_cpu(bytes, repeats, cases);
    if (device == "cuda" || device == "all") run_cuda(bytes, repeats, cases);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meshtrain-bench-compress: %s\n", e.what());
    return 1;
  }
  if (failures > 0) std::fprintf(stderr, "meshtrain-bench-compress: %d measurement(s) failed\n", failures);
  return failures > 0 ? 1 : 0;
}
