// kernels/compress/api.h: device memory, copies, the NaN/Inf scan and the fp32 add (their
// kernels are in common_kernels.cuh).
#include "common_kernels.cuh"
#include "cuda_util.cuh"

namespace meshtrain::cuda::compress {

using namespace detail;

bool available() noexcept { return true; }

namespace {

// Frees device memory with `device` current, for destructors: errors are ignored.
template <typename Free>
void free_on(int device, Free free) noexcept {
  int previous = 0;
  if (cudaGetDevice(&previous) == cudaSuccess && previous != device) (void)cudaSetDevice(device);
  free();
  if (previous != device) (void)cudaSetDevice(previous);
}

}  // namespace

DeviceBuffer::DeviceBuffer(size_t bytes, int device) : bytes_(bytes), device_(device) {
  DeviceGuard guard(device);
  check(cudaMalloc(&data_, std::max<size_t>(bytes, 1)), "cudaMalloc", device);
  // The zero fill runs on the legacy default stream, which callers' non-blocking streams do not
  // wait for: finish it here so that the buffer is zero whichever stream uses it first.
  cudaError_t err = cudaMemset(data_, 0, std::max<size_t>(bytes, 1));
  if (err == cudaSuccess) err = cudaStreamSynchronize(cudaStreamLegacy);
  if (err != cudaSuccess) {
    (void)cudaFree(data_);
    data_ = nullptr;
    check(err, "cudaMemset", device);
  }
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) free_on(device_, [&] { (void)cudaFree(data_); });
}

StreamBuffer::StreamBuffer(size_t bytes, int device, void* stream) : device_(device), stream_(stream) {
  DeviceGuard guard(device);
  check(cudaMallocAsync(&data_, std::max<size_t>(bytes, 1), as_stream(stream)), "cudaMallocAsync", device);
}

StreamBuffer::~StreamBuffer() {
  if (data_ != nullptr) free_on(device_, [&] { (void)cudaFreeAsync(data_, as_stream(stream_)); });
}

StreamBuffer::StreamBuffer(StreamBuffer&& other) noexcept
    : data_(other.data_), device_(other.device_), stream_(other.stream_) {
  other.data_ = nullptr;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(other.data_), bytes_(other.bytes_), device_(other.device_) {
  other.data_ = nullptr;
  other.bytes_ = 0;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    DeviceBuffer dying(std::move(*this));
    data_ = other.data_;
    bytes_ = other.bytes_;
    device_ = other.device_;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void* allocate_pinned(size_t bytes, int device) {
  DeviceGuard guard(device);
  void* p = nullptr;
  const cudaError_t err = cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocPortable);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not sticky: later calls start clean
    return nullptr;
  }
  check(err, "cudaHostAlloc", device);
  return p;
}

void free_pinned(void* p) noexcept {
  if (p != nullptr && cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();
}

void* stream_create(int device) {
  DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags", device);
  return s;
}

void stream_destroy(void* stream, int device) noexcept {
  if (stream == nullptr) return;
  int previous = 0;
  if (cudaGetDevice(&previous) == cudaSuccess && previous != device) (void)cudaSetDevice(device);
  (void)cudaStreamDestroy(as_stream(stream));
  if (previous != device) (void)cudaSetDevice(previous);
}

void copy_async(void* dst, const void* src, size_t bytes, int device, void* stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream)), "cudaMemcpyAsync", device);
}

void synchronize(int device, void* stream) {
  DeviceGuard guard(device);
  check(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize", device);
}

void zero_async(void* d_x, size_t bytes, int device, void* stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  check(cudaMemsetAsync(d_x, 0, bytes, as_stream(stream)), "cudaMemsetAsync", device);
}

size_t find_nonfinite(const float* d_x, size_t n, int device, void* stream) {
  if (n == 0) return 0;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  auto* first = static_cast<unsigned long long*>(thread_scratch(device));
  unsigned long long host = n;
  check(cudaMemcpyAsync(first, &host, sizeof host, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync", device);
  MT_LAUNCH(find_nonfinite_kernel, grid_for(n), kThreads, 0, s)(d_x, n, first);
  check_launch("find_nonfinite kernel", device);
  check(cudaMemcpyAsync(&host, first, sizeof host, cudaMemcpyDeviceToHost, s),
        "cudaMemcpyAsync", device);
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize", device);
  return static_cast<size_t>(host);
}

void add_async(float* d_acc, const float* d_x, size_t n, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(add_kernel, grid_for(n), kThreads, 0, as_stream(stream))(d_acc, d_x, n);
  check_launch("add kernel", device);
}

void scale_async(float* d_x, size_t n, float factor, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  MT_LAUNCH(scale_kernel, grid_for(n), kThreads, 0, as_stream(stream))(d_x, n, factor);
  check_launch("scale kernel", device);
}

}  // namespace meshtrain::cuda::compress
