#include <gtest/gtest.h>

#include <string>

#include "kernels/runtime.h"

namespace meshtrain {
namespace {

TEST(CudaRuntimeTest, DescriptionIsNeverEmpty) {
  EXPECT_FALSE(cuda::runtime_description().empty());
}

TEST(CudaRuntimeTest, DeviceCountIsStableAndNonNegative) {
  int first = cuda::device_count();
  EXPECT_GE(first, 0);
  EXPECT_EQ(cuda::device_count(), first);
}

TEST(CudaRuntimeTest, DescriptionMentionsDeviceCount) {
  int n = cuda::device_count();
  std::string description = cuda::runtime_description();
  if (n == 0) GTEST_SKIP() << "no CUDA device: " << description;
  std::string expected = std::to_string(n) + (n == 1 ? " device" : " devices");
  EXPECT_NE(description.find(expected), std::string::npos) << description;
  EXPECT_EQ(description.rfind("CUDA runtime ", 0), 0u) << description;
}

}  // namespace
}  // namespace meshtrain
