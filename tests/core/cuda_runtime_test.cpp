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
  const char* start = cuda::simulated() ? "simulated device" : "CUDA runtime ";
  EXPECT_EQ(description.rfind(start, 0), 0u) << description;
}

TEST(CudaRuntimeTest, OnlyTheSimBuildSimulates) {
#ifdef MESHTRAIN_TEST_SIM_DEVICE
  EXPECT_TRUE(cuda::simulated());
  EXPECT_EQ(cuda::device_count(), 1);
#else
  EXPECT_FALSE(cuda::simulated());
#endif
}

}  // namespace
}  // namespace meshtrain
