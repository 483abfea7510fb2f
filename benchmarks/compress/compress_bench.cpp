// Google Benchmark: codec encode / decode / decode_accumulate throughput on the CPU, next to a
// memcpy of the same bytes in the same run; GPU kernels next to a device-to-device copy when a
// GPU is present (otherwise one skipped entry says why).
//
//   build/benchmarks/compress/compress_bench --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true      (one command line)
//
// bytes_per_second counts the fp32 gradient bytes (4 per element), for every codec and op, so
// that the figures compare with the memcpy line directly. The JSON records for
// docs/benchmarks.md come from meshtrain-bench-compress (bench_records.cpp).
#include <benchmark/benchmark.h>

#include <cstring>

#include "benchmarks/compress/cases.h"
#include "kernels/compress/api.h"
#include "kernels/runtime.h"

using namespace meshtrain;
using namespace meshtrain::compress;
using namespace meshtrain::compress::bench;
namespace kc = meshtrain::cuda::compress;

namespace {

void BM_Memcpy(benchmark::State& state) {
  const size_t bytes = state.range(0);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * bytes);
}

enum class Op { Encode, Decode, DecodeAccumulate };

void BM_Codec(benchmark::State& state, std::string spec_text, Op op) {
  const size_t count = state.range(0) / 4;
  auto codec = make_codec(spec_text);
  TensorSpec spec = spec_for(spec_text, count);
  auto codec_state = codec->make_state(spec);
  auto grad = gradient(count);
  std::vector<uint8_t> payload(codec->encoded_bytes(spec));
  prefault(payload);
  BufferView g{grad.data(), count, DType::Float32};
  codec->encode(g, *codec_state, payload);
  std::vector<float> out(count);
  prefault(out);
  BufferView o{out.data(), count, DType::Float32};
  for (auto _ : state) {
    switch (op) {
      case Op::Encode: codec->encode(g, *codec_state, payload); break;
      case Op::Decode: codec->decode(payload, o); break;
      case Op::DecodeAccumulate: codec->decode_accumulate(payload, o); break;
    }
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * count * 4);
  state.counters["payload_bytes"] = double(payload.size());
}

void BM_CudaUnavailable(benchmark::State& state) {
  for (auto _ : state) {
  }
  state.SkipWithError(("no CUDA device: " + cuda::runtime_description()).c_str());
}

// GPU: the kernels alone on device buffers (what the 80%-of-copy target is about).
void BM_CudaCopy(benchmark::State& state) {
  const size_t bytes = state.range(0);
  kc::DeviceBuffer a(bytes, 0), b(bytes, 0);
  void* s = kc::stream_create(0);
  for (auto _ : state) {
    kc::copy_async(b.data(), a.data(), bytes, 0, s);
    kc::synchronize(0, s);
  }
  kc::stream_destroy(s, 0);
  state.SetBytesProcessed(int64_t(state.iterations()) * bytes);
}

void BM_CudaKernel(benchmark::State& state, std::string kernel) {
  const size_t n = state.range(0) / 4;
  auto host = gradient(n);
  kc::DeviceBuffer x(n * 4, 0), r(n * 4, 0), out(n * 4, 0), scales((n / 256 + 1) * 4, 0);
  void* s = kc::stream_create(0);
  kc::copy_async(x.data(), host.data(), n * 4, 0, s);
  kc::synchronize(0, s);
  for (auto _ : state) {
    if (kernel == "fp16_encode") kc::fp32_to_fp16(x.as<float>(), out.as<uint16_t>(), n, 0, s);
    else if (kernel == "fp16_decode") kc::fp16_to_fp32(out.as<uint16_t>(), x.as<float>(), n, false, 0, s);
    else if (kernel == "bf16_encode") kc::fp32_to_bf16(x.as<float>(), out.as<uint16_t>(), n, 0, s);
    else if (kernel == "bf16_decode") kc::bf16_to_fp32(out.as<uint16_t>(), x.as<float>(), n, false, 0, s);
    else if (kernel == "int8_encode")
      kc::int8_quantize(x.as<float>(), r.as<float>(), n, 256, false, 0, 0, out.as<int8_t>(), scales.as<float>(), 0, s);
    else if (kernel == "int8_decode")
      kc::int8_dequantize(out.as<int8_t>(), scales.as<float>(), n, 256, r.as<float>(), false, 0, s);
    else if (kernel == "int8_decode_accumulate")
      kc::int8_dequantize(out.as<int8_t>(), scales.as<float>(), n, 256, r.as<float>(), true, 0, s);
    kc::synchronize(0, s);
  }
  kc::stream_destroy(s, 0);
  state.SetBytesProcessed(int64_t(state.iterations()) * n * 4);
}

void BM_CudaCodec(benchmark::State& state, std::string spec_text, Op op) {
  const size_t count = state.range(0) / 4;
  auto codec = make_codec(spec_text);
  TensorSpec spec = spec_for(spec_text, count);
  spec.device = DeviceKind::Cuda;
  auto codec_state = codec->make_state(spec);
  auto host = gradient(count);
  kc::DeviceBuffer x(count * 4, 0), o(count * 4, 0);
  void* s = kc::stream_create(0);
  kc::copy_async(x.data(), host.data(), count * 4, 0, s);
  kc::synchronize(0, s);
  BufferView g{x.data(), count, DType::Float32, DeviceKind::Cuda, 0};
  BufferView out{o.data(), count, DType::Float32, DeviceKind::Cuda, 0};
  std::vector<uint8_t> payload(codec->encoded_bytes(spec));
  codec->encode(g, *codec_state, payload, CudaStream{s});
  for (auto _ : state) {
    if (op == Op::Encode) codec->encode(g, *codec_state, payload, CudaStream{s});
    else if (op == Op::Decode) codec->decode(payload, out, CudaStream{s});
    else codec->decode_accumulate(payload, out, CudaStream{s});
  }
  kc::stream_destroy(s, 0);
  state.SetBytesProcessed(int64_t(state.iterations()) * count * 4);
}

void register_all() {
  const int64_t mib64 = int64_t(64) << 20;
  benchmark::RegisterBenchmark("cpu/memcpy", BM_Memcpy)->Arg(mib64)->Unit(benchmark::kMillisecond);
  for (const auto& c : codec_cases()) {
    for (auto [op, name] : {std::pair{Op::Encode, "encode"}, std::pair{Op::Decode, "decode"},
                            std::pair{Op::DecodeAccumulate, "decode_accumulate"}}) {
      benchmark::RegisterBenchmark(("cpu/" + c.spec + "/" + name).c_str(), BM_Codec, c.spec, op)
          ->Arg(mib64)
          ->Unit(benchmark::kMillisecond);
    }
  }
  if (cuda::device_count() == 0) {
    benchmark::RegisterBenchmark("cuda/unavailable", BM_CudaUnavailable)->Iterations(1);
    return;
  }
  const int64_t mib256 = int64_t(256) << 20;
  benchmark::RegisterBenchmark("cuda/copy_d2d", BM_CudaCopy)->Arg(mib256)->UseRealTime();
  for (const char* k : {"fp16_encode", "fp16_decode", "bf16_encode", "bf16_decode", "int8_encode", "int8_decode",
                        "int8_decode_accumulate"})
    benchmark::RegisterBenchmark((std::string("cuda/kernel/") + k).c_str(), BM_CudaKernel, std::string(k))
        ->Arg(mib256)
        ->UseRealTime();
  for (const auto& c : codec_cases())
    benchmark::RegisterBenchmark(("cuda/codec/" + c.spec + "/encode").c_str(), BM_CudaCodec, c.spec, Op::Encode)
        ->Arg(mib256)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
