// Every collective and dtype, in one process: an in-process Coordinator and one Communicator
// per thread (each with its own identity, sockets and ZeroMQ context).
#include <gtest/gtest.h>

#include <atomic>
#include <limits>
#include <thread>

#include "collective/gradient.h"
#include "collective/half.h"
#include "collective/in_process_job.h"
#include "kernels/compress/api.h"
#include "meshtrain/collective.h"

using namespace meshtrain;
using namespace meshtrain::collective;
using namespace std::chrono_literals;
using test_support::InProcessJob;

TEST(HalfConversion, EveryHalfRoundTripsAndMatchesTheCompiler) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    uint16_t h = static_cast<uint16_t>(bits);
    _Float16 native;
    std::memcpy(&native, &h, 2);
    float f = half_to_float(h);
    float expected = static_cast<float>(native);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(f));
      continue;
    }
    ASSERT_EQ(float_to_bits(f), float_to_bits(expected)) << std::hex << bits;
    ASSERT_EQ(float_to_half(f), h) << std::hex << bits;
  }
  std::vector<float> samples = test_support::gradient(7, 1, 200000);
  for (float& x : samples) {
    for (float scale : {1e-8f, 1e-5f, 1.0f, 3e4f, 7e4f}) {
      float v = x * scale;
      _Float16 native = static_cast<_Float16>(v);
      uint16_t bits;
      std::memcpy(&bits, &native, 2);
      ASSERT_EQ(float_to_half(v), bits) << v;
    }
  }
}

TEST(HalfConversion, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808000)), 0x3f80);  // tie -> even
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f818000)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808001)), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

TEST(Collectives, AllreduceInHalfPrecisionIsIdenticalEverywhere) {
  InProcessJob job(3);
  const size_t count = 10007;
  for (DType dtype : {DType::Float16, DType::BFloat16}) {
    std::vector<std::vector<uint16_t>> buffers(job.size(), std::vector<uint16_t>(count));
    std::vector<double> reference(count, 0.0);
    for (int i = 0; i < job.size(); ++i) {
      auto g = test_support::gradient(i, 1, count);
      for (size_t k = 0; k < count; ++k) {
        buffers[i][k] = dtype == DType::Float16 ? float_to_half(g[k]) : float_to_bf16(g[k]);
        reference[k] += dtype == DType::Float16 ? half_to_float(buffers[i][k]) : bf16_to_float(buffers[i][k]);
      }
    }
    job.each(dtype == DType::Float16 ? 1 : 2, [&](int i) {
      job.comm(i).allreduce(BufferView{buffers[i].data(), count, dtype}, ReduceOp::Sum);
    });
    for (int i = 1; i < job.size(); ++i) EXPECT_EQ(buffers[i], buffers[0]);
    const double tolerance = dtype == DType::Float16 ? 2e-3 : 1.6e-2;
    for (size_t k = 0; k < count; ++k) {
      double got = dtype == DType::Float16 ? half_to_float(buffers[0][k]) : bf16_to_float(buffers[0][k]);
      ASSERT_NEAR(got, reference[k], tolerance * std::max(1.0, std::abs(reference[k]))) << k;
    }
  }
}

TEST(Collectives, BroadcastAllgatherReduceScatter) {
  InProcessJob job(4);
  const size_t count = 5003;
  // broadcast from every root in turn
  for (uint32_t root = 0; root < 4; ++root) {
    std::vector<std::vector<float>> data(4);
    for (int i = 0; i < 4; ++i) data[i] = test_support::gradient(100 + i, root, count);
    job.each(10 + root, [&](int i) {
      job.comm(i).broadcast(BufferView{data[i].data(), count, DType::Float32}, root);
    });
    int root_index = -1;
    for (int i = 0; i < 4; ++i)
      if (job.comm(i).rank() == root) root_index = i;
    auto expected = test_support::gradient(100 + root_index, root, count);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(data[i], expected) << "member " << i << " root " << root;
  }
  // allgather
  std::vector<std::vector<float>> in(4), out(4, std::vector<float>(4 * count));
  for (int i = 0; i < 4; ++i) in[i] = test_support::gradient(200 + i, 0, count);
  job.each(20, [&](int i) {
    job.comm(i).allgather(BufferView{in[i].data(), count, DType::Float32},
                          BufferView{out[i].data(), 4 * count, DType::Float32});
  });
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(out[i], out[0]);
    uint32_t r = job.comm(i).rank();
    EXPECT_TRUE(std::equal(in[i].begin(), in[i].end(), out[0].begin() + r * count)) << "block of rank " << r;
  }
  // reduce_scatter
  std::vector<std::vector<float>> full(4), part(4, std::vector<float>(count));
  for (int i = 0; i < 4; ++i) full[i] = test_support::gradient(300 + i, 0, 4 * count);
  job.each(21, [&](int i) {
    job.comm(i).reduce_scatter(BufferView{full[i].data(), 4 * count, DType::Float32},
                               BufferView{part[i].data(), count, DType::Float32}, ReduceOp::Avg);
  });
  for (int i = 0; i < 4; ++i) {
    uint32_t r = job.comm(i).rank();
    for (size_t k = 0; k < count; ++k) {
      double sum = 0;
      for (int j = 0; j < 4; ++j) sum += full[j][r * count + k];
      ASSERT_NEAR(part[i][k], sum / 4, 1e-6) << "member " << i << " element " << k;
    }
  }
}

TEST(Collectives, NonMemberCannotOpenABulkStream) {
  InProcessJob job(2);
  auto outsider = crypto::Identity::generate();
  std::atomic<bool> done{false};
  std::atomic<int> refused{0};
  // The outsider keeps trying while the members reduce.
  auto intruder = std::async(std::launch::async, [&] {
    while (!done) {
      try {
        net::BulkStream::connect(outsider, job.comm(0).id(), "127.0.0.1", job.comm(0).bulk_port(), {},
                                 Deadline::after(300ms));
        ADD_FAILURE() << "a non-member opened a bulk stream";
      } catch (const Error&) {
        ++refused;
      }
    }
  });
  for (uint64_t step = 1; step <= 5; ++step) {
    std::vector<std::vector<float>> data(2, std::vector<float>(100000, 1.0f));
    job.each(step, [&](int i) {
      job.comm(i).allreduce(BufferView{data[i].data(), data[i].size(), DType::Float32}, ReduceOp::Sum);
    });
    EXPECT_EQ(data[0], std::vector<float>(100000, 2.0f));
  }
  done = true;
  intruder.get();
  EXPECT_GT(refused.load(), 0);
}

TEST(Collectives, RejectsUnusableBuffers) {
  InProcessJob job(1);
  job.comm(0).next_quorum(1);
  std::vector<int64_t> ints(4);
  EXPECT_THROW(job.comm(0).allreduce(BufferView{ints.data(), 4, DType::Int64}, ReduceOp::Sum), InvalidArgumentError);
  std::vector<float> a(4), b(5);
  EXPECT_THROW(job.comm(0).allgather(BufferView{a.data(), 4, DType::Float32}, BufferView{b.data(), 5, DType::Float32}),
               InvalidArgumentError);
  EXPECT_THROW(job.comm(0).broadcast(BufferView{a.data(), 4, DType::Float32}, 3), InvalidArgumentError);
  // A single member reduces to itself.
  std::vector<float> x = {1, 2, 3, 4};
  job.comm(0).allreduce(BufferView{x.data(), 4, DType::Float32}, ReduceOp::Avg);
  EXPECT_EQ(x, std::vector<float>({1, 2, 3, 4}));
}

// Buffers on a CUDA device in a build without CUDA: every collective refuses them, naming the
// operation and the device, before anything is sent. (With CUDA: tests/collective/cuda_test.cpp.)
TEST(Collectives, CudaBuffersInABuildWithoutCudaAreRefused) {
  if (cuda::compress::available()) GTEST_SKIP() << "built with CUDA: collective_cuda_test covers CUDA buffers";
  InProcessJob job(1);
  job.comm(0).next_quorum(1);
  float fake = 0;  // never dereferenced: the device check comes first
  const BufferView on_gpu{&fake, 1, DType::Float32, DeviceKind::Cuda, 0};
  const BufferView on_cpu{&fake, 1, DType::Float32};
  auto expect_refused = [](const std::string& op, auto&& call) {
    try {
      call();
      ADD_FAILURE() << op << " took a CUDA buffer in a build without CUDA";
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(op + ": buffer is on cuda:0 but meshtrain was built without CUDA"),
                std::string::npos) << e.what();
    }
  };
  Communicator& c = job.comm(0);
  expect_refused("allreduce", [&] { c.allreduce(on_gpu, ReduceOp::Sum); });
  expect_refused("broadcast", [&] { c.broadcast(on_gpu, 0); });
  expect_refused("allgather", [&] { c.allgather(on_cpu, on_gpu); });
  expect_refused("reduce_scatter", [&] { c.reduce_scatter(on_gpu, on_cpu, ReduceOp::Sum); });
  auto codec = compress::make_codec("int8");
  CompressedState state;
  expect_refused("allreduce_compressed", [&] { c.allreduce_compressed(on_gpu, *codec, state, ReduceOp::Avg); });
  expect_refused("reduce_step", [&] { c.reduce_step(2, on_gpu); });
  expect_refused("reduce_step", [&] { c.reduce_step(2, on_gpu, *codec, state); });
}

TEST(Collectives, NonFiniteGradientIsRefusedBeforeSending) {
  InProcessJob job(1);
  std::vector<float> grads(1000, 1.0f);
  grads[417] = std::nanf("");
  try {
    job.comm(0).reduce_step(1, BufferView{grads.data(), grads.size(), DType::Float32});
    FAIL() << "a NaN gradient was accepted";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("element 417"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(std::isnan(grads[417]));  // left as it was
  EXPECT_EQ(grads[0], 1.0f);
}

// The compressed all-reduce refuses a NaN/Inf gradient before anything is sent, with every
// codec (PowerSGD through its project step), naming the element, and leaves the gradient and
// the CompressedState as they were: the next, clean step gives a fresh state's bytes.
TEST(Collectives, CompressedNonFiniteGradientIsRefusedAndChangesNothing) {
  InProcessJob job(1);
  const size_t count = 1000;
  uint64_t step = 1;
  for (const char* spec : {"none", "fp16", "int8", "topk:fraction=0.1", "powersgd:rank=2", "powersgd:rank=20"}) {
    SCOPED_TRACE(spec);
    auto codec = compress::make_codec(spec);
    CompressedOptions options;
    options.shape = {40, 25};  // PowerSGD: rank 20 does not compress 40 x 25 (sent as it is)
    CompressedState used(options), fresh(options);
    std::vector<float> bad = test_support::gradient(1, 1, count);
    bad[417] = -std::numeric_limits<float>::infinity();
    const std::vector<float> before = bad;
    try {
      job.comm(0).reduce_step(step++, BufferView{bad.data(), count, DType::Float32}, *codec, used);
      ADD_FAILURE() << "an Inf gradient was accepted";
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("element 417"), std::string::npos) << e.what();
    }
    EXPECT_EQ(std::memcmp(bad.data(), before.data(), count * sizeof(float)), 0) << "the gradient changed";
    std::vector<float> a = test_support::gradient(2, 1, count), b = a;
    job.comm(0).reduce_step(step++, BufferView{a.data(), count, DType::Float32}, *codec, used);
    job.comm(0).reduce_step(step++, BufferView{b.data(), count, DType::Float32}, *codec, fresh);
    EXPECT_EQ(a, b) << "the refused step changed the state";
    EXPECT_EQ(used.member_residual(), fresh.member_residual());
  }
}

// Element 700 travels in the reduce-scatter (chunk 1 is reduced at rank 1), element 3 in the
// all-gather (chunk 0 is reduced at rank 0 and copied to rank 1): both are checked.
class NonFiniteFromPeer : public ::testing::TestWithParam<size_t> {};

TEST_P(NonFiniteFromPeer, NamesItsSender) {
  const size_t bad_index = GetParam();
  InProcessJob job(2);
  std::vector<std::vector<float>> grads(2, std::vector<float>(1000, 1.0f));
  std::vector<std::future<void>> done;
  for (int i = 0; i < 2; ++i) {
    done.push_back(std::async(std::launch::async, [&, i] {
      auto& comm = job.comm(i);
      comm.next_quorum(1);
      if (comm.rank() == 0) {
        // The faulty member bypasses the gradient check (plain allreduce) and sends an Inf.
        grads[i][bad_index] = INFINITY;
        try {
          comm.allreduce(BufferView{grads[i].data(), 1000, DType::Float32}, ReduceOp::Avg);
        } catch (const Error&) {
          // Aborted when the other member refused the value (or finished first: no commit here).
        }
      } else {
        const std::string faulty = comm.quorum().members[0].id.fingerprint();
        try {
          comm.reduce_step(1, BufferView{grads[i].data(), 1000, DType::Float32}, /*max_attempts=*/1);
          ADD_FAILURE() << "an Inf partial sum was accepted";
        } catch (const PeerLostError& e) {
          EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
          EXPECT_NE(std::string(e.what()).find(faulty), std::string::npos) << e.what();
        }
      }
    }));
  }
  for (auto& f : done) f.get();
}

INSTANTIATE_TEST_SUITE_P(Phases, NonFiniteFromPeer, ::testing::Values(size_t{700}, size_t{3}));

// The compressed all-reduce with Sum (reduce_step only uses Avg), over two steps so that a
// residual taken against the wrong approximation shows: member i contributes the rank-1
// matrix (i + 1) x u v^T (sum up to 63 in magnitude): PowerSGD (rank 2) carries it to rounding,
// int8 within its quanta (3 members' half quanta of 0.125 plus the owner's 0.25, and the
// residual carried into step 2); a residual against the summed approximation would be off by
// tens.
TEST(Collectives, CompressedSumOfRankOneGradients) {
  InProcessJob job(3);
  const size_t rows = 40, cols = 50, count = rows * cols;
  for (const char* spec : {"int8", "powersgd:rank=2"}) {
    SCOPED_TRACE(spec);
    auto codec = compress::make_codec(spec);
    CompressedOptions options;
    options.shape = {rows, cols};
    std::vector<CompressedState> states;
    for (int i = 0; i < job.size(); ++i) states.emplace_back(options);
    for (uint64_t step = 1; step <= 2; ++step) {
      std::vector<std::vector<float>> data(job.size(), std::vector<float>(count));
      for (int i = 0; i < job.size(); ++i)
        for (size_t r = 0; r < rows; ++r)
          for (size_t c = 0; c < cols; ++c) data[i][r * cols + c] = (i + 1) * (1.0f + r % 7) * (0.5f - c % 3);
      job.each(std::string(spec) == "int8" ? 30 + step : 40 + step, [&](int i) {
        job.comm(i).allreduce_compressed(BufferView{data[i].data(), count, DType::Float32}, *codec, states[i],
                                         ReduceOp::Sum);
      });
      for (int i = 1; i < job.size(); ++i) EXPECT_EQ(data[i], data[0]) << "member " << i;
      for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < cols; ++c) {
          const float exact = 6 * (1.0f + r % 7) * (0.5f - c % 3);
          ASSERT_NEAR(data[0][r * cols + c], exact, codec->id() == compress::CodecId::Int8 ? 1.0 : 0.01)
              << "step " << step << " element " << r * cols + c;
        }
    }
  }
}

// PowerSGD's P and Q are floats summed over the ring: a member whose P overflowed (a finite
// gradient of 3e38s, so M Q exceeds float) or came corrupt must not reach anyone's output,
// residual or warm start, also outside reduce_step: refused, naming the sender.
TEST(Collectives, PowerSgdNonFiniteFactorFromAPeerIsRefusedNamingIt) {
  InProcessJob job(2);
  const size_t rows = 40, cols = 25, count = rows * cols;
  auto codec = compress::make_codec("powersgd:rank=2");
  CompressedOptions options;
  options.shape = {rows, cols};
  std::vector<CompressedState> states;
  for (int i = 0; i < job.size(); ++i) states.emplace_back(options);
  std::vector<std::vector<float>> data(job.size(), std::vector<float>(count, 1.0f));
  std::fill(data[0].begin(), data[0].end(), 3e38f);
  const std::string faulty = job.comm(0).id().fingerprint();
  job.each(90, [&](int i) {
    const BufferView view{data[i].data(), count, DType::Float32};
    if (i == 0) {
      EXPECT_THROW(job.comm(i).allreduce_compressed(view, *codec, states[i], ReduceOp::Avg), Error);
      return;
    }
    try {
      job.comm(i).allreduce_compressed(view, *codec, states[i], ReduceOp::Avg);
      ADD_FAILURE() << "a non-finite P was summed";
    } catch (const PeerLostError& e) {
      EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(faulty), std::string::npos) << e.what();
    }
    for (float v : data[i]) ASSERT_EQ(v, 1.0f) << "the refused operation wrote the output";
  });
}

// A member's own failure that is not a meshtrain::Error (here a std::runtime_error from a
// payload hook; in life std::bad_alloc, a thread that could not start): it reaches that
// member's caller as it was, the others are told at once (their PeerLostError carries its
// reason instead of waiting out op_timeout), and every Communicator works on at the next step.
TEST(Collectives, AMembersOwnStdExceptionReachesItsCallerAndTheOthersAreTold) {
  InProcessJob job(3);
  const size_t count = 3000;
  auto codec = compress::make_codec("fp16");
  std::vector<CompressedState> states(job.size());
  states[0] = CompressedState(CompressedOptions{.payload_hook = [](uint32_t, std::span<uint8_t>) {
    throw std::runtime_error("the payload hook gave up");
  }});
  std::vector<std::vector<float>> data(job.size());
  for (int i = 0; i < job.size(); ++i) data[i] = test_support::gradient(60 + i, 1, count);
  job.each(70, [&](int i) {
    const BufferView view{data[i].data(), count, DType::Float32};
    if (i == 0) {
      EXPECT_THROW(job.comm(i).allreduce_compressed(view, *codec, states[i], ReduceOp::Avg), std::runtime_error);
      return;
    }
    try {
      job.comm(i).allreduce_compressed(view, *codec, states[i], ReduceOp::Avg);
      ADD_FAILURE() << "member " << i << " finished an operation member 0 failed";
    } catch (const PeerLostError& e) {
      EXPECT_NE(std::string(e.what()).find("the payload hook gave up"), std::string::npos) << e.what();
    }
  });
  for (int i = 0; i < job.size(); ++i) data[i] = test_support::gradient(80 + i, 2, count);
  job.each(71, [&](int i) { job.comm(i).allreduce(BufferView{data[i].data(), count, DType::Float32}, ReduceOp::Sum); });
  for (int i = 1; i < job.size(); ++i) EXPECT_EQ(data[i], data[0]) << "member " << i;
}

namespace {

// PowerSGD by linearity between two members, recomputed from compress.h's powersgd_* calls
// (member i's gradient at step s: test_support::gradient(i, s, count)). With two members each
// all-reduced sum has two terms, so its order does not matter: the all-reduce's bytes can be
// compared with these exactly.
class TwoMemberPowerSgd {
 public:
  TwoMemberPowerSgd(const std::string& spec, size_t rows, size_t cols)
      : codec_(compress::make_codec(spec)), rows_(rows), cols_(cols) {
    for (int i = 0; i < 2; ++i) states_.push_back(codec_->make_state(compress::TensorSpec{{rows, cols}}));
    shape_ = compress::powersgd_shape(*states_[0]);
    CompressedOptions options;
    options.shape = {rows, cols};
    for (int i = 0; i < 2; ++i) members.emplace_back(options);
  }
  const compress::Codec& codec() const { return *codec_; }
  const compress::LowRankShape& shape() const { return shape_; }
  size_t count() const { return rows_ * cols_; }
  std::vector<CompressedState> members;  // the all-reduce's states of the two members

  // One step: members in `contributing` add their gradients, the others zeros. The output.
  std::vector<float> step(uint64_t step, const std::vector<bool>& contributing) {
    const size_t count = rows_ * cols_;
    std::vector<float> p(shape_.rows * shape_.rank, 0.0f), q(shape_.cols * shape_.rank, 0.0f);
    std::vector<std::vector<float>> ps(2, p), qs(2, q);
    std::vector<std::unique_ptr<compress::CodecState>> scratch(2);
    auto state_of = [&](int i) -> compress::CodecState& {
      if (contributing[i]) return *states_[i];
      if (!scratch[i]) scratch[i] = codec_->make_state(compress::TensorSpec{{rows_, cols_}});
      return *scratch[i];
    };
    for (int i = 0; i < 2; ++i) {
      std::vector<float> g = contributing[i] ? test_support::gradient(i, step, count) : std::vector<float>(count, 0.0f);
      compress::powersgd_project(view(g), state_of(i), ps[i]);
    }
    for (size_t k = 0; k < p.size(); ++k) p[k] = ps[0][k] + ps[1][k];
    const std::vector<float> summed = p;
    for (int i = 0; i < 2; ++i) {
      std::vector<float> mine = summed;  // each member orthonormalises the summed p itself
      compress::powersgd_back_project(state_of(i), mine, qs[i]);
      if (i == 0) p = mine;
    }
    const float contributors = static_cast<float>(std::count(contributing.begin(), contributing.end(), true));
    for (size_t k = 0; k < q.size(); ++k) q[k] = (qs[0][k] + qs[1][k]) / contributors;
    std::vector<float> out(count);
    for (int i = 0; i < 2; ++i) {
      std::vector<float> o(count);
      compress::powersgd_finish(state_of(i), p, q, view(o));
      if (contributing[i]) out = o;
      else compress::powersgd_adopt_q(*states_[i], q);
    }
    return out;
  }

  static BufferView view(std::vector<float>& v) { return BufferView{v.data(), v.size(), DType::Float32}; }

 private:
  std::unique_ptr<compress::Codec> codec_;
  size_t rows_, cols_;
  std::vector<std::unique_ptr<compress::CodecState>> states_;
  compress::LowRankShape shape_;
};

}  // namespace

// PowerSGD with a member that is a joiner at step 3 (it adds zeros): it must take that step's Q
// as its warm start, so that at step 4 both members project onto the same Q. The results of
// all four steps equal the algorithm (TwoMemberPowerSgd). From step 2 on each step's copy of a
// member's state goes into the one the step before replaced (the joiner's kept state at step
// 3 too).
TEST(Collectives, PowerSgdJoinerTakesTheStepsWarmStart) {
  InProcessJob job(2, /*min_peers=*/1);
  TwoMemberPowerSgd reference("powersgd:rank=3,seed=5", 30, 20);
  ASSERT_EQ(reference.shape().rank, 3u);
  const size_t count = reference.count();

  for (uint64_t step = 1; step <= 4; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const bool second_joins = step == 3;
    std::vector<std::vector<float>> data = {test_support::gradient(0, step, count),
                                            test_support::gradient(1, step, count)};
    std::vector<std::future<void>> done;
    for (int i = 0; i < 2; ++i)
      done.push_back(std::async(std::launch::async, [&, i] {
        job.comm(i).next_quorum(100 + step, /*has_state=*/!(i == 1 && second_joins));
        job.comm(i).allreduce_compressed(TwoMemberPowerSgd::view(data[i]), reference.codec(), reference.members[i],
                                         ReduceOp::Avg);
      }));
    for (auto& f : done) f.get();
    ASSERT_EQ(job.comm(0).quorum().contributors(), second_joins ? 1u : 2u);
    const std::vector<float> expected = reference.step(step, {true, !second_joins});
    for (int i = 0; i < 2; ++i)
      EXPECT_EQ(std::memcmp(data[i].data(), expected.data(), count * sizeof(float)), 0) << "member " << i;
  }
}

// A PowerSGD step whose first attempt fails mid-way (member 0's fault hook throws during the
// all-gather of its P all-reduce, after both members projected) is retried by reduce_step from
// the entry states: every step's bytes equal the unfailed algorithm's. The retry copies the
// committed states into the failed attempt's copies (the spares).
TEST(Collectives, PowerSgdStepRetriedAfterAFailedAttemptEqualsTheUnfailedAlgorithm) {
  std::atomic<bool> armed{false};
  InProcessJob job(2, 0, [&armed](int member, CommunicatorOptions& o) {
    if (member == 0)
      o.fault_hook = [&armed](std::string_view phase, size_t) {
        if (phase == "all_gather" && armed.exchange(false)) throw PeerLostError("", "injected: the attempt fails");
      };
  });
  TwoMemberPowerSgd reference("powersgd:rank=3,seed=7", 30, 20);
  const size_t count = reference.count();
  for (uint64_t step = 1; step <= 4; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    armed = step == 2 || step == 3;
    std::vector<std::vector<float>> data = {test_support::gradient(0, step, count),
                                            test_support::gradient(1, step, count)};
    std::vector<StepResult> results(2);
    std::vector<std::future<void>> done;
    for (int i = 0; i < 2; ++i)
      done.push_back(std::async(std::launch::async, [&, i] {
        results[i] = job.comm(i).reduce_step(step, TwoMemberPowerSgd::view(data[i]), reference.codec(),
                                             reference.members[i]);
      }));
    for (auto& f : done) f.get();
    EXPECT_FALSE(armed) << "the fault was not injected";
    for (int i = 0; i < 2; ++i) EXPECT_EQ(results[i].attempts, step == 2 || step == 3 ? 2u : 1u) << "member " << i;
    const std::vector<float> expected = reference.step(step, {true, true});
    for (int i = 0; i < 2; ++i)
      EXPECT_EQ(std::memcmp(data[i].data(), expected.data(), count * sizeof(float)), 0) << "member " << i;
  }
}
