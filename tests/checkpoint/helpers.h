// Helpers shared by the checkpoint tests: saving with several writer threads, damaging files.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <vector>

#include "checkpoint/test_state.h"
#include "meshtrain/checkpoint.h"

namespace meshtrain::test_support {

namespace fs = std::filesystem;

inline checkpoint::SaveOptions small_blocks(uint32_t rank = 0, uint32_t world = 1) {
  checkpoint::SaveOptions o;
  o.rank = rank;
  o.world_size = world;
  o.block_bytes = 4096;  // many blocks, so that partial reads and block checks are exercised
  o.finalize_timeout = std::chrono::seconds(30);
  return o;
}

// Saves `state` with `world` writer threads (rank 0 finalizes); returns rank 0's result.
inline checkpoint::SaveResult save_with_writers(const fs::path& root, TestState& state, uint32_t world,
                                                checkpoint::SaveOptions base = small_blocks()) {
  checkpoint::State view = state.view();
  std::vector<std::future<checkpoint::SaveResult>> writers;
  for (uint32_t r = 0; r < world; ++r) {
    checkpoint::SaveOptions o = base;
    o.rank = r;
    o.world_size = world;
    if (o.save_id.empty()) o.save_id = "test-" + std::to_string(state.step);
    writers.push_back(std::async(std::launch::async, [&root, &view, o] { return checkpoint::save(root, view, o); }));
  }
  checkpoint::SaveResult first;
  for (uint32_t r = 0; r < world; ++r) {
    auto result = writers[r].get();
    if (r == 0) first = std::move(result);
  }
  return first;
}

inline std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

inline void flip_byte(const fs::path& p, uint64_t offset) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << p;
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c ^= 0x5a;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

// Runs `fn`, expecting an exception of type E whose message contains every `parts` entry.
template <typename E, typename Fn>
std::string expect_error(Fn&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const E& e) {
    std::string m = e.what();
    for (const auto& p : parts) EXPECT_NE(m.find(p), std::string::npos) << "message \"" << m << "\" lacks \"" << p << "\"";
    return m;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return {};
  }
  ADD_FAILURE() << "no exception";
  return {};
}

}  // namespace meshtrain::test_support
