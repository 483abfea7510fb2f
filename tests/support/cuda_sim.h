// Runs CUDA kernel source on the CPU, for tests of kernel logic on hosts without a GPU. Each
// CUDA thread of a block is a fiber (ucontext) on the calling thread; blocks run one after
// another; __syncthreads is a barrier over the block's live threads, and each warp intrinsic
// (ballot, match, shuffles) an exchange among the warp's 32 threads at a barrier. Scheduling is
// cooperative and deterministic: a fiber runs until it reaches a barrier or returns.
//
// What it checks: indexing, ranks, barriers and the warp-synchronous logic of kernels written
// against the built-ins below (thread and block indices, __syncthreads[_count], ballot,
// match_any, shuffles of integers, atomicAdd/Min, float4 / char4, max), with full warps. A
// full-mask warp intrinsic reached after a lane of its warp has returned (undefined on a GPU)
// counts in cuda_sim::violations(); threads that wait at barriers no other thread will reach (a
// GPU would hang), lanes meeting in different intrinsics, a grid of 0 blocks and over 48 KiB of
// dynamic shared memory abort the test with a message. Under AddressSanitizer the fiber
// switches are annotated, so out-of-bounds accesses by a kernel are reported.
// What it cannot check: timing, memory ordering beyond barriers and launches, occupancy, and
// anything the compiler does differently for a GPU; the CUDA tests on a GPU remain the reference.
//
// Include it before the kernels, then launch with cuda_sim::launch(grid, threads, shared_bytes,
// kernel, args...). A fixed schedule could hide a missing barrier (a thread reading what a
// lower-numbered thread wrote without __syncthreads would always see it), so tests run each
// case under both orders (cuda_sim::for_each_order): forward, and blocks and threads in reverse.
// Each OS thread has its own simulator (state and __shared__ variables are thread-local), so
// threads may launch at once, as the collectives' do on the simulated device (sim_device/).
// Limits: __shared__ variables are function statics, so a block that reads one before writing
// it sees the previous block's value instead of garbage; lanes that reach different warp
// intrinsics of the same kind pair up as on no GPU (different kinds abort).
#pragma once

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_SIM_ASAN 1
#endif
#endif
#ifdef CUDA_SIM_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define MESHTRAIN_CUDA_SIM 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

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
  int kind[32] = {};  // which intrinsic each lane is in: lanes of one call must agree
  unsigned exited = 0;
};

enum class Order { Forward, Reverse };

struct State {
  ucontext_t scheduler{};
  Fiber* current = nullptr;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Barrier block;
  unsigned long long pending = 0, published = 0;  // __syncthreads_count's sum before / after
  std::vector<Warp> warps;
  alignas(16) unsigned char dynamic_shared[48 * 1024];  // kMaxDynamicShared
  std::function<void()> body;
  unsigned block_index = 0, grid_blocks = 1, block_threads = 1;
  Order order = Order::Forward;
  int violations = 0;
#ifdef CUDA_SIM_ASAN
  void* fake_stack = nullptr;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
#endif
};
inline State& state() {
  static thread_local State s;
  return s;
}
inline int violations() { return state().violations; }

// Runs `body` once per schedule order (forward, then reverse); it should launch and check.
template <typename Body>
void for_each_order(Body&& body) {
  for (Order o : {Order::Forward, Order::Reverse}) {
    state().order = o;
    body(o == Order::Forward ? "forward order" : "reverse order");
  }
  state().order = Order::Forward;
}

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute's opt-in

// AddressSanitizer follows the stack switches when told (fiber annotations).
inline void switch_to_fiber(ucontext_t* from, ucontext_t* to, const void* stack, size_t bytes) {
#ifdef CUDA_SIM_ASAN
  __sanitizer_start_switch_fiber(&state().fake_stack, stack, bytes);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(state().fake_stack, nullptr, nullptr);
#else
  (void)stack, (void)bytes;
  swapcontext(from, to);
#endif
}
inline void switch_to_scheduler(ucontext_t* from) {
#ifdef CUDA_SIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, state().scheduler_stack, state().scheduler_stack_bytes);
  swapcontext(from, &state().scheduler);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(from, &state().scheduler);
#endif
}

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
  switch_to_scheduler(&s.current->context);
}

inline void arrive_and_drop(Barrier& b, bool is_block) {
  --b.expected;
  if (b.expected > 0 && b.arrived == b.expected) release(b, is_block);
}

inline void fiber_entry() {
  State& s = state();
#ifdef CUDA_SIM_ASAN
  // The scheduler's stack, to switch back to.
  __sanitizer_finish_switch_fiber(nullptr, &s.scheduler_stack, &s.scheduler_stack_bytes);
#endif
  s.body();
  Fiber* f = s.current;
  Warp& w = s.warps[f->index / 32];
  ++w.exited;
  w.kind[f->index % 32] = 0;
  arrive_and_drop(w.sync, false);
  arrive_and_drop(s.block, true);
  f->done = true;  // uc_link returns to the scheduler
#ifdef CUDA_SIM_ASAN
  __sanitizer_start_switch_fiber(nullptr, s.scheduler_stack, s.scheduler_stack_bytes);  // this fiber ends
#endif
}

inline Warp& my_warp() { return state().warps[state().current->index / 32]; }
inline unsigned my_lane() { return state().current->index % 32; }

// Every lane publishes `mine`; each gets f(slots, its lane) once all have.
enum Intrinsic { kBallot = 1, kMatchAny, kShfl, kShflUp, kShflXor };
template <typename F>
unsigned long long exchange(int kind, unsigned mask, unsigned long long mine, F f) {
  if (mask != 0xffffffffu) fail("only full-mask warp intrinsics are simulated");
  Warp& w = my_warp();
  w.slot[my_lane()] = mine;
  w.kind[my_lane()] = kind;
  arrive_and_wait(w.sync, false);
  if (w.exited != 0) ++state().violations;  // a lane returned before this full-mask call
  for (unsigned l = 0; l < 32; ++l)
    if (w.kind[l] != kind && w.kind[l] != 0) fail("lanes of one warp met in different warp intrinsics");
  const unsigned long long r = f(w.slot, my_lane());
  arrive_and_wait(w.sync, false);  // nobody rewrites a slot before every lane has read
  return r;
}

template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned threads, size_t shared_bytes, Kernel kernel, Args... args) {
  if (threads == 0 || threads % 32 != 0 || threads > 1024) fail("blocks of 1 to 32 whole warps only");
  if (grid == 0) fail("a grid of 0 blocks (an invalid configuration on a GPU)");
  if (shared_bytes > kMaxDynamicShared) fail("over 48 KiB of dynamic shared memory (an opt-in on a GPU)");
  State& s = state();
  s.grid_blocks = grid;
  s.block_threads = threads;
  s.body = [&] { kernel(args...); };
  while (s.stacks.size() < threads) s.stacks.push_back(std::make_unique<char[]>(kStackBytes));
  for (unsigned i = 0; i < grid; ++i) {
    const unsigned b = s.order == Order::Forward ? i : grid - 1 - i;
    s.block_index = b;
    s.block = Barrier{threads, 0, {}};
    s.pending = s.published = 0;
    s.warps.assign(threads / 32, Warp{});
    for (Warp& w : s.warps) w.sync.expected = 32;
    std::memset(s.dynamic_shared, 0xa5, sizeof s.dynamic_shared);  // shared memory starts undefined
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
      for (unsigned j = 0; j < threads; ++j) {
        Fiber& f = s.fibers[s.order == Order::Forward ? j : threads - 1 - j];
        if (f.done) continue;
        ++live;
        if (f.blocked) continue;
        ran = true;
        s.current = &f;
        switch_to_fiber(&s.scheduler, &f.context, s.stacks[f.index].get(), kStackBytes);
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
#define blockDim (dim3{cuda_sim::state().block_threads, 1, 1})
#define gridDim (dim3{cuda_sim::state().grid_blocks, 1, 1})

inline uint32_t* dynamic_shared_words() { return reinterpret_cast<uint32_t*>(cuda_sim::state().dynamic_shared); }

inline void __syncthreads() { cuda_sim::arrive_and_wait(cuda_sim::state().block, true); }
inline int __syncthreads_count(int predicate) {
  if (predicate) ++cuda_sim::state().pending;
  cuda_sim::arrive_and_wait(cuda_sim::state().block, true);  // publishes the sum
  return static_cast<int>(cuda_sim::state().published);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const auto ballot = [](const unsigned long long* s, unsigned) {
    unsigned long long bits = 0;
    for (unsigned l = 0; l < 32; ++l) bits |= (s[l] != 0 ? 1ull : 0ull) << l;
    return bits;
  };
  return static_cast<unsigned>(cuda_sim::exchange(cuda_sim::kBallot, mask, predicate != 0, ballot));
}
inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  const auto match = [](const unsigned long long* s, unsigned lane) {
    unsigned long long bits = 0;
    for (unsigned l = 0; l < 32; ++l) bits |= (s[l] == s[lane] ? 1ull : 0ull) << l;
    return bits;
  };
  return static_cast<unsigned>(cuda_sim::exchange(cuda_sim::kMatchAny, mask, value, match));
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  static_assert(std::is_integral_v<T>, "cuda_sim shuffles integers only");
  return static_cast<T>(cuda_sim::exchange(cuda_sim::kShfl, mask, static_cast<unsigned long long>(value),
                                           [&](const unsigned long long* s, unsigned) { return s[src_lane & 31]; }));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  static_assert(std::is_integral_v<T>, "cuda_sim shuffles integers only");
  return static_cast<T>(cuda_sim::exchange(cuda_sim::kShflUp, mask, static_cast<unsigned long long>(value),
                                           [&](const unsigned long long* s, unsigned lane) {
                                             return lane >= delta ? s[lane - delta] : s[lane];
                                           }));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_integral_v<T>, "cuda_sim shuffles integers only");
  return static_cast<T>(cuda_sim::exchange(cuda_sim::kShflXor, mask, static_cast<unsigned long long>(value),
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
