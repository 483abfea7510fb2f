#include "collective/reused_bytes.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

#include "compress/common.h"
#include "kernels/compress/api.h"
#include "meshtrain/core.h"

namespace meshtrain::collective {

namespace kc = cuda::compress;

void HostBytesFree::operator()(uint8_t* p) const noexcept {
  if (memory == HostMemory::Pinned)
    kc::free_pinned(p);
  else
    std::free(p);
}

ReusedBytes::ReusedBytes(ReusedBytes&& other) noexcept
    : data_(std::move(other.data_)),
      capacity_(std::exchange(other.capacity_, 0)),
      held_(std::exchange(other.held_, HostMemory::Pageable)),
      pin_refused_(std::exchange(other.pin_refused_, false)) {}

ReusedBytes& ReusedBytes::operator=(ReusedBytes&& other) noexcept {
  data_ = std::move(other.data_);
  capacity_ = std::exchange(other.capacity_, 0);
  held_ = std::exchange(other.held_, HostMemory::Pageable);
  pin_refused_ = std::exchange(other.pin_refused_, false);
  return *this;
}

std::span<uint8_t> ReusedBytes::take(size_t bytes, HostMemory memory, int device) {
  const bool kind_fits = held_ == memory || held_ == HostMemory::Pinned || pin_refused_;
  if (bytes <= capacity_ && kind_fits) return {data_.get(), bytes};

  const bool pin = memory == HostMemory::Pinned || held_ == HostMemory::Pinned;
  const size_t size = pin ? std::max(bytes, capacity_ + capacity_ / 2) : bytes;
  data_.reset();  // not old and new at once
  capacity_ = 0;
  held_ = HostMemory::Pageable;
  pin_refused_ = false;
  if (pin) {
    void* p = compress::detail::cuda_call("allocating pinned host memory",
                                          [&] { return kc::allocate_pinned(size, device); });
    if (p != nullptr) {
      data_ = std::unique_ptr<uint8_t[], HostBytesFree>(static_cast<uint8_t*>(p), HostBytesFree{HostMemory::Pinned});
      held_ = HostMemory::Pinned;
    } else {
      static std::atomic<bool> warned{false};
      if (!warned.exchange(true))
        log::warn("collective", "page-locked host memory of {} bytes refused on cuda:{}; staging through pageable "
                  "memory instead, so copies to and from the GPU are slower", size, device);
      pin_refused_ = true;
    }
  }
  if (!data_) {
    // 64-byte alignment, as the floats and the vectorised loops over them like it.
    if (size > SIZE_MAX - 64) throw std::bad_alloc();
    void* p = std::aligned_alloc(64, (std::max<size_t>(size, 1) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    data_ = std::unique_ptr<uint8_t[], HostBytesFree>(static_cast<uint8_t*>(p), HostBytesFree{HostMemory::Pageable});
  }
  capacity_ = size;
  return {data_.get(), bytes};
}

}  // namespace meshtrain::collective
