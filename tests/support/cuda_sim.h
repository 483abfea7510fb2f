// Runs CUDA kernel source on the CPU, for tests of kernel logic on hosts without a GPU. Each
// CUDA thread of a block is a fiber (ucontext) on the calling thread; blocks run one after
// another; __syncthreads is a barrier over the block's live threads, and each warp intrinsic
// (ballot, match, shuffles) an exchange among the warp's 32 threads at a barrier. Scheduling is
// cooperative and deterministic: a fiber runs until it reaches a barrier or returns.
//
// What it checks: indexing, ranks, barriers and the warp-synchronous logic of kernels written
// against the built-ins below (thread and block indices, __syncthreads[_count], ballot,
// match_any, shuffles of integers, atomicAdd, float4 / char4, max), with full warps. A full-mask warp intrinsic reached after a lane
// of its warp has returned (undefined on a GPU) counts in cuda_sim::violations(); threads that
// wait at barriers no other thread will reach (a GPU would hang) abort the test with a message.
// What it cannot check: timing, memory ordering beyond barriers and launches, occupancy, and
// anything the compiler does differently for a GPU; the CUDA tests on a GPU remain the reference.
//
// Include it before the kernels, then launch with cuda_sim::launch(grid, threads, shared_bytes,
// kernel, args...). __shared__ variables are function statics: right while blocks run one at a
// time, as here, and never read before written in a block (as CUDA requires anyway).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define MESHTRAIN_CUDA_SIM 1

// For gtest tests that use the simulator: AddressSanitizer does not follow ucontext's stack
// switches (false reports), so they skip under it.
#if defined(__SANITIZE_ADDRESS__)
#define CUDA_SIM_SKIP_UNDER_ASAN() \
  GTEST_SKIP() << "cuda_sim switches stacks with ucontext, which AddressSanitizer does not follow"
#else
#define CUDA_SIM_SKIP_UNDER_ASAN() (void)0
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace cuda_sim {

[[noreturn]] inline void fail(const char* why) {
  std::fprintf(stderr, "cuda_sim: %s\n", why);
  std::abort();
}

struct Fiber {
  ucontext_t context{};
  unsigned index = 0;
  bool blocked = false;
  bool done = false;
};

struct Barrier {
  unsigned expected = 0, arrived = 0;
  std::vector<Fiber*> waiting;
};

struct Warp {
  Barrier sync;
  unsigned long long slot[32] = {};
  unsigned exited = 0;
};

struct State {
  ucontext_t scheduler{};
  Fiber* current = nullptr;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Barrier block;
  unsigned long long pending = 0, published = 0;  // __syncthreads_count's sum before / after
  std::vector<Warp> warps;
  std::vector<unsigned long long> dynamic_shared;
  std::function<void()> body;
  unsigned block_index = 0, grid_blocks = 1, block_threads = 1;
  int violations = 0;
};
inline State& state() {
  static State s;
  return s;
}
inline int violations() { return state().violations; }

constexpr size_t kStackBytes = 64 * 1024;

inline void release(Barrier& b, bool is_block) {
  if (is_block) {
    state().published = state().pending;
    state().pending = 0;
  }
  for (Fiber* f : b.waiting) f->blocked = false;
  b.waiting.clear();
  b.arrived = 0;
}

inline void arrive_and_wait(Barrier& b, bool is_block) {
  State& s = state();
  if (++b.arrived == b.expected) {
    release(b, is_block);  // the last to arrive goes on; the others run when scheduled
    return;
  }
  s.current->blocked = true;
  b.waiting.push_back(s.current);
  swapcontext(&s.current->context, &s.scheduler);
}

inline void arrive_and_drop(Barrier& b, bool is_block) {
  --b.expected;
  if (b.expected > 0 && b.arrived == b.expected) release(b, is_block);
}

inline void fiber_entry() {
  State& s = state();
  s.body();
  Fiber* f = s.current;
  Warp& w = s.warps[f->index / 32];
  ++w.exited;
  arrive_and_drop(w.sync, false);
  arrive_and_drop(s.block, true);
  f->done = true;  // uc_link returns to the scheduler
}

inline Warp& my_warp() { return state().warps[state().current->index / 32]; }
inline unsigned my_lane() { return state().current->index % 32; }

// Every lane publishes `mine`; each gets f(slots, its lane) once all have.
template <typename F>
unsigned long long exchange(unsigned mask, unsigned long long mine, F f) {
  if (mask != 0xffffffffu) fail("only full-mask warp intrinsics are simulated");
  Warp& w = my_warp();
  w.slot[my_lane()] = mine;
  arrive_and_wait(w.sync, false);
  if (w.exited != 0) ++state().violations;  // a lane returned before this full-mask call
  const unsigned long long r = f(w.slot, my_lane());
  arrive_and_wait(w.sync, false);  // nobody rewrites a slot before every lane has read
  return r;
}

template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned threads, size_t shared_bytes, Kernel kernel, Args... args) {
  if (threads == 0 || threads % 32 != 0 || threads > 1024) fail("blocks of 1 to 32 whole warps only");
  State& s = state();
  s.grid_blocks = grid;
  s.block_threads = threads;
  s.body = [&] { kernel(args...); };
  while (s.stacks.size() < threads) s.stacks.push_back(std::make_unique<char[]>(kStackBytes));
  for (unsigned b = 0; b < grid; ++b) {
    s.block_index = b;
    s.block = Barrier{threads, 0, {}};
    s.pending = s.published = 0;
    s.warps.assign(threads / 32, Warp{});
    for (Warp& w : s.warps) w.sync.expected = 32;
    s.dynamic_shared.assign(shared_bytes / 8 + 1, 0xa5a5a5a5a5a5a5a5ull);  // shared memory starts undefined
    s.fibers.assign(threads, Fiber{});
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = s.fibers[t];
      f.index = t;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = s.stacks[t].get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &s.scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
    for (unsigned live = threads; live > 0;) {
      bool ran = false;
      live = 0;
      for (Fiber& f : s.fibers) {
        if (f.done) continue;
        ++live;
        if (f.blocked) continue;
        ran = true;
        s.current = &f;
        swapcontext(&s.scheduler, &f.context);
        s.current = nullptr;
      }
      if (live > 0 && !ran) fail("deadlock: every live thread waits at a barrier that cannot complete");
    }
  }
  s.body = nullptr;
}

}  // namespace cuda_sim

#define threadIdx (dim3{cuda_sim::state().current->index, 0, 0})
#define blockIdx (dim3{cuda_sim::state().block_index, 0, 0})
#define blockDim (dim3{cuda_sim::state().block_threads, 0, 0})
#define gridDim (dim3{cuda_sim::state().grid_blocks, 0, 0})

inline uint32_t* dynamic_shared_words() {
  return reinterpret_cast<uint32_t*>(cuda_sim::state().dynamic_shared.data());
}

inline void __syncthreads() { cuda_sim::arrive_and_wait(cuda_sim::state().block, true); }
inline int __syncthreads_count(int predicate) {
  if (predicate) ++cuda_sim::state().pending;
  cuda_sim::arrive_and_wait(cuda_sim::state().block, true);  // publishes the sum
  return static_cast<int>(cuda_sim::state().published);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(cuda_sim::exchange(mask, predicate != 0, [](const unsigned long long* s, unsigned) {
    unsigned long long bits = 0;
    for (unsigned l = 0; l < 32; ++l) bits |= (s[l] != 0 ? 1ull : 0ull) << l;
    return bits;
  }));
}
inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(cuda_sim::exchange(mask, value, [](const unsigned long long* s, unsigned lane) {
    unsigned long long bits = 0;
    for (unsigned l = 0; l < 32; ++l) bits |= (s[l] == s[lane] ? 1ull : 0ull) << l;
    return bits;
  }));
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  static_assert(std::is_integral_v<T>, "cuda_sim shuffles integers only");
  return static_cast<T>(cuda_sim::exchange(mask, static_cast<unsigned long long>(value),
                                           [&](const unsigned long long* s, unsigned) { return s[src_lane & 31]; }));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  static_assert(std::is_integral_v<T>, "cuda_sim shuffles integers only");
  return static_cast<T>(cuda_sim::exchange(mask, static_cast<unsigned long long>(value),
                                           [&](const unsigned long long* s, unsigned lane) {
                                             return lane >= delta ? s[lane - delta] : s[lane];
                                           }));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_integral_v<T>, "cuda_sim shuffles integers only");
  return static_cast<T>(cuda_sim::exchange(mask, static_cast<unsigned long long>(value),
                                           [&](const unsigned long long* s, unsigned lane) {
                                             return s[(lane ^ static_cast<unsigned>(lane_mask)) & 31];
                                           }));
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;  // one OS thread: plain read-modify-write is atomic here
  *address = old + value;
  return old;
}

// CUDA's vector types and device max, as the kernels use them.
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(4) char4 {
  signed char x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}
