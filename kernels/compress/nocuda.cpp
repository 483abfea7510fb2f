// kernels/compress/api.h for builds without CUDA: available() is false, and lib/compress
// checks it before calling anything else, so the other functions only guard against misuse.
#include "api.h"

namespace meshtrain::cuda::compress {
namespace {

[[noreturn]] void unavailable(const char* what) {
  throw CudaFailure(std::string(what) + ": meshtrain was built without CUDA");
}

}  // namespace

bool available() noexcept { return false; }

DeviceBuffer::DeviceBuffer(size_t, int) { unavailable("DeviceBuffer"); }
DeviceBuffer::~DeviceBuffer() = default;
DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(other.data_), bytes_(other.bytes_), device_(other.device_) {
  other.data_ = nullptr;
  other.bytes_ = 0;
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  data_ = other.data_;
  bytes_ = other.bytes_;
  device_ = other.device_;
  other.data_ = nullptr;
  other.bytes_ = 0;
  return *this;
}

StreamBuffer::StreamBuffer(size_t, int, void*) { unavailable("StreamBuffer"); }
StreamBuffer::~StreamBuffer() = default;
StreamBuffer::StreamBuffer(StreamBuffer&& other) noexcept
    : data_(other.data_), device_(other.device_), stream_(other.stream_) {
  other.data_ = nullptr;
}

void* allocate_pinned(size_t, int) { unavailable("allocate_pinned"); }
void free_pinned(void*) noexcept {}
void* stream_create(int) { unavailable("stream_create"); }
void stream_destroy(void*, int) noexcept {}
void copy_async(void*, const void*, size_t, int, void*) { unavailable("copy_async"); }
void synchronize(int, void*) { unavailable("synchronize"); }
void zero_async(void*, size_t, int, void*) { unavailable("zero_async"); }
size_t find_nonfinite(const float*, size_t, int, void*) { unavailable("find_nonfinite"); }
void add_async(float*, const float*, size_t, int, void*) { unavailable("add_async"); }
void scale_async(float*, size_t, float, int, void*) { unavailable("scale_async"); }
CastCounts fp32_to_fp16(const float*, uint16_t*, size_t, int, void*) { unavailable("fp32_to_fp16"); }
CastCounts fp32_to_bf16(const float*, uint16_t*, size_t, int, void*) { unavailable("fp32_to_bf16"); }
void fp16_to_fp32(const uint16_t*, float*, size_t, bool, int, void*) { unavailable("fp16_to_fp32"); }
void bf16_to_fp32(const uint16_t*, float*, size_t, bool, int, void*) { unavailable("bf16_to_fp32"); }
void int8_quantize(const float*, float*, size_t, uint32_t, bool, uint64_t, uint64_t, int8_t*, float*, int,
                   void*) {
  unavailable("int8_quantize");
}
void int8_dequantize(const int8_t*, const float*, size_t, uint32_t, float*, bool, int, void*) {
  unavailable("int8_dequantize");
}
size_t topk_workspace_bytes(size_t) { unavailable("topk_workspace_bytes"); }
void magnitude_histogram(const float*, size_t, uint32_t, uint32_t, uint32_t, uint32_t, uint64_t*, void*,
                         size_t, int, void*, bool) {
  unavailable("magnitude_histogram");
}
void topk_compact(const float*, float*, size_t, uint32_t, uint64_t, uint32_t*, float*, uint64_t, void*, size_t,
                  int, void*, bool) {
  unavailable("topk_compact");
}
size_t topk_sampled_workspace_bytes(size_t, uint64_t, int) { unavailable("topk_sampled_workspace_bytes"); }
bool topk_select_sampled(const float*, float*, size_t, uint64_t, uint32_t*, float*, void*, size_t, int, void*,
                         uint64_t*) {
  unavailable("topk_select_sampled");
}
void scatter_add(const uint32_t*, const float*, uint64_t, float*, int, void*) { unavailable("scatter_add"); }
void lowrank_project(const float*, const float*, size_t, size_t, uint32_t, float*, int, void*) {
  unavailable("lowrank_project");
}
void lowrank_back_project(const float*, const float*, size_t, size_t, uint32_t, float*, int, void*) {
  unavailable("lowrank_back_project");
}
void lowrank_reconstruct(const float*, const float*, size_t, size_t, uint32_t, float*, LowRankWrite, int, void*) {
  unavailable("lowrank_reconstruct");
}

}  // namespace meshtrain::cuda::compress
