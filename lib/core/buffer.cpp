#include "meshtrain/core.h"

namespace meshtrain {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Int64: return 8;
    case DType::UInt8: return 1;
    case DType::Int32: return 4;
  }
  throw InvalidArgumentError(fmt::format("unknown dtype {}", static_cast<int>(dtype)));
}

std::string_view dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
    case DType::Int32: return "int32";
  }
  return "unknown";
}

}  // namespace meshtrain
