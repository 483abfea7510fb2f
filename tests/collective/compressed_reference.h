// What the compressed all-reduce tests compare against: docs/compression.md's algorithm
// recomputed here from the codec alone, and the step records of a Job's peers.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>

#include "collective/gradient.h"
#include "collective/job.h"
#include "meshtrain/compress.h"

namespace meshtrain::test_support {

using namespace std::chrono_literals;

inline std::vector<float> read_floats(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

inline size_t chunk_begin(size_t count, size_t n, size_t c) { return count * c / n; }

// docs/compression.md's compressed all-reduce with Avg, recomputed from the codec: member j (in
// rank order) encodes chunk c of its gradient with its state for chunk c; the owner of chunk c
// decode_accumulates the payloads in rank order, divides by n, re-encodes with its own state;
// everyone decodes that. With all_gather (top-k), every member's whole-buffer payload is
// decode_accumulated in rank order instead.
class ReferenceReduce {
 public:
  ReferenceReduce(const compress::Codec& codec, size_t count, size_t n, bool all_gather)
      : codec_(codec), count_(count), n_(n), chunks_(all_gather ? 1 : n), all_gather_(all_gather) {
    member_.resize(n);
    for (size_t j = 0; j < n; ++j)
      for (size_t c = 0; c < chunks_; ++c) member_[j].push_back(codec.make_state(spec(c)));
    for (size_t c = 0; c < chunks_; ++c) owner_.push_back(codec.make_state(spec(c)));
  }

  std::vector<float> reduce(const std::vector<std::vector<float>>& grads) {
    std::vector<float> out(count_);
    for (size_t c = 0; c < chunks_; ++c) {
      const size_t begin = chunk_begin(count_, chunks_, c), size = chunk_begin(count_, chunks_, c + 1) - begin;
      std::vector<float> sum(size, 0.0f);
      for (size_t j = 0; j < n_; ++j) {
        std::vector<uint8_t> p = encode(grads[j].data() + begin, size, *member_[j][c]);
        codec_.decode_accumulate(p, view(sum.data(), size));
      }
      for (float& x : sum) x /= static_cast<float>(n_);
      if (all_gather_) {
        std::copy(sum.begin(), sum.end(), out.begin() + begin);
      } else {
        codec_.decode(encode(sum.data(), size, *owner_[c]), view(out.data() + begin, size));
      }
    }
    return out;
  }
  // Member j's residual over the whole buffer.
  std::vector<float> residual(size_t j) const {
    std::vector<float> r;
    for (const auto& s : member_[j]) {
      auto part = s->residual();
      r.insert(r.end(), part.begin(), part.end());
    }
    return r;
  }

 private:
  compress::TensorSpec spec(size_t c) const {
    return compress::TensorSpec::flat(chunk_begin(count_, chunks_, c + 1) - chunk_begin(count_, chunks_, c));
  }
  static BufferView view(float* p, size_t n) { return BufferView{p, n, DType::Float32}; }
  std::vector<uint8_t> encode(const float* x, size_t size, compress::CodecState& state) const {
    std::vector<uint8_t> p(codec_.encoded_bytes(size));
    p.resize(codec_.encode(view(const_cast<float*>(x), size), state, p));
    return p;
  }

  const compress::Codec& codec_;
  size_t count_, n_, chunks_;
  bool all_gather_;
  std::vector<std::vector<std::unique_ptr<compress::CodecState>>> member_;
  std::vector<std::unique_ptr<compress::CodecState>> owner_;
};

// The contributors of `step` (rank order) as job indices; the same record on every peer.
inline std::vector<int> ranks_of_step(const Job& job, const std::vector<int>& peers, uint64_t step) {
  const StepRecord first = job.log(peers[0]).steps.at(step);
  for (int p : peers) {
    const StepRecord r = job.log(p).steps.at(step);
    EXPECT_EQ(r.quorum_id, first.quorum_id) << "peer " << p << " step " << step;
    EXPECT_EQ(r.contributors, first.contributors) << "peer " << p << " step " << step;
    EXPECT_EQ(r.result, first.result) << "result bytes of peer " << p << " differ from peer " << peers[0]
                                      << " at step " << step;
  }
  std::vector<int> ranks;
  for (const auto& key : first.contributors) ranks.push_back(job.index_of(key));
  return ranks;
}

struct CodecCase {
  std::string codec;
  std::string sparse_gather;
  std::string name;
  std::string exchange = "direct";  // how the encoded chunks reach their owners
};

// 4 processes, 3 steps of reduce_step with codec case `c` (peer i also gets extra_flags(i)):
// every member ends each step with the same bytes, those of the reference algorithm (which
// also fixes the residual each member must carry out of step 3); dense codecs stay within 0.02
// of the exact average.
inline void expect_reference_bytes(const CodecCase& c,
                                   const std::function<std::vector<std::string>(int)>& extra_flags = {}) {
  const size_t count = 10007;
  const int peers = 4;
  Job job({.peers = peers, .min_peers = peers});
  job.start_coordinator();
  for (int i = 0; i < peers; ++i) {
    std::vector<std::string> flags = {"--codec", c.codec, "--sparse-gather", c.sparse_gather, "--exchange", c.exchange};
    if (extra_flags) {
      std::vector<std::string> more = extra_flags(i);
      flags.insert(flags.end(), more.begin(), more.end());
    }
    job.start_peer(i, 3, count, flags);
  }
  for (int i = 0; i < peers; ++i) ASSERT_EQ(job.peer(i).wait(60s), 0) << "peer " << i;
  auto codec = compress::make_codec(c.codec);
  const bool all_gather = c.sparse_gather == "allgather";
  ReferenceReduce reference(*codec, count, peers, all_gather);
  std::vector<int> ranks;
  for (uint64_t step = 1; step <= 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    ranks = ranks_of_step(job, {0, 1, 2, 3}, step);
    ASSERT_EQ(ranks.size(), 4u);
    std::vector<std::vector<float>> grads;
    for (int index : ranks) grads.push_back(gradient(Job::seed(index), step, count));
    std::vector<float> expected = reference.reduce(grads);
    std::vector<float> got = job.result(0, step);
    ASSERT_EQ(got.size(), count);
    EXPECT_EQ(std::memcmp(got.data(), expected.data(), count * sizeof(float)), 0) << "differs from the reference";
    // Dense codecs: close to the exact average too (the codec's error, not a wrong sum). Top-k
    // sends a few entries plus earlier residuals, so only the reference comparison applies.
    if (codec->id() == compress::CodecId::TopK) continue;
    double worst = 0;
    for (size_t k = 0; k < count; ++k) {
      double avg = 0;
      for (const auto& g : grads) avg += g[k];
      worst = std::max(worst, std::abs(got[k] - avg / peers));
    }
    EXPECT_LT(worst, 0.02);
  }
  // The residual each member carries out of step 3 is the reference's: fed exactly once a step.
  for (size_t r = 0; r < ranks.size(); ++r)
    EXPECT_EQ(read_floats(job.output_path(ranks[r], ".3.after.bin")), reference.residual(r)) << "rank " << r;
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Peer 2 is SIGKILLed at index `at` of `phase` in step 2 (int8, error feedback on). With the
// direct exchange, "reduce_scatter" index 0 is before its first payload leaves and index k after
// it took k payloads for its own chunk; with the ring, the ring step. Every survivor's failed
// attempt names peer 2 as lost. The 3 survivors retry step 2 and finish; the retried result
// must be exactly a fresh compressed all-reduce among the survivors started from the residuals
// they had on entry to step 2 (a residual fed twice, or an owner re-encode of the aborted
// attempt kept, would change it), and the residual each survivor leaves step 2 with is that
// fresh run's. `cuda_peers` reduce from buffers on CUDA device 0.
inline void kill_mid_compressed(const std::string& phase, int at = 1, const std::string& exchange = "direct",
                                const std::vector<int>& cuda_peers = {}) {
  const size_t count = 20011;
  const std::string spec = "int8:block_size=128";
  // CUDA members announce themselves before making their CUDA context, but a slow first
  // context must not let step 1 form without them (min_peers is 2): a longer grace.
  Job job({.peers = 4, .min_peers = 2, .quorum_timeout_ms = 5000, .heartbeat_timeout_ms = 2000,
           .startup_grace_ms = cuda_peers.empty() ? 2000 : 10000, .capture_output = true});
  job.start_coordinator();
  for (int i = 0; i < 4; ++i) {
    std::vector<std::string> extra = {"--codec", spec, "--exchange", exchange};
    if (std::find(cuda_peers.begin(), cuda_peers.end(), i) != cuda_peers.end())
      extra.insert(extra.end(), {"--device", "cuda"});
    if (i == 2)
      extra.insert(extra.end(), {"--die-at", "2", "--die-phase", phase, "--die-ring-step", std::to_string(at)});
    job.start_peer(i, 3, count, extra);
  }
  EXPECT_EQ(job.peer(2).wait(60s), 128 + SIGKILL);
  for (int i : {0, 1, 3}) ASSERT_EQ(job.peer(i).wait(60s), 0) << "survivor " << i;
  const std::vector<int> survivors = {0, 1, 3};
  const std::string victim = crypto::PeerId::from_hex(job.key(2)).fingerprint();
  for (int i : survivors) {
    const std::string log = read_text(job.log_path(i));
    EXPECT_NE(log.find("step 2 attempt 1: "), std::string::npos) << "survivor " << i << " did not fail attempt 1";
    EXPECT_NE(log.find("lost: " + victim), std::string::npos) << "survivor " << i << " did not name peer 2:\n" << log;
  }
  EXPECT_EQ(ranks_of_step(job, survivors, 1).size(), 4u);
  std::vector<int> ranks = ranks_of_step(job, survivors, 2);
  ASSERT_EQ(ranks.size(), 3u);
  EXPECT_GE(job.log(0).steps.at(2).attempts, 2u);

  auto codec = compress::make_codec(spec);
  ReferenceReduce fresh(*codec, count, 3, false);
  std::vector<std::vector<float>> inputs;
  for (int index : ranks) {
    std::vector<float> g = gradient(Job::seed(index), 2, count);
    std::vector<float> before = read_floats(job.output_path(index, ".2.before.bin"));
    ASSERT_EQ(before.size(), count) << "peer " << index << " had no residual after step 1";
    for (size_t k = 0; k < count; ++k) g[k] += before[k];
    inputs.push_back(std::move(g));
  }
  std::vector<float> expected = fresh.reduce(inputs);
  std::vector<float> got = job.result(0, 2);
  ASSERT_EQ(got.size(), count);
  EXPECT_EQ(std::memcmp(got.data(), expected.data(), count * sizeof(float)), 0)
      << "the retried step is not a fresh run from the survivors' entry states";
  for (size_t r = 0; r < ranks.size(); ++r)
    EXPECT_EQ(read_floats(job.output_path(ranks[r], ".2.after.bin")), fresh.residual(r)) << "rank " << r;
  EXPECT_EQ(ranks_of_step(job, survivors, 3).size(), 3u);
}

}  // namespace meshtrain::test_support
