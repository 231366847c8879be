// The execution engine of the CUDA emulation (tests/cuda_emulation/build.py, include/emu_cuda.h).
//
// A launch runs its blocks one after another (x fastest, then y, then z). The threads of a block
// are fibers (makecontext/swapcontext) of the launching OS thread: the scheduler runs every runnable
// thread until it waits (at __syncthreads or a warp collective) or exits, then resolves what the
// waiting threads wait for, and repeats. Resolution checks what the hardware would punish:
//   - a warp collective (__shfl_*_sync, __ballot_sync, __syncwarp) completes when every lane its
//     mask names waits at a collective of the same kind, mask, width and value size; the caller must
//     be in its mask, a shuffle must read a lane of the mask, and the mask must not name exited
//     lanes, lanes the block does not have, or lanes waiting at __syncthreads;
//   - __syncthreads completes when every thread of the block waits there, at the same call site
//     (file:line), with no thread exited;
//   - nothing can proceed: deadlock, reported with where each thread waits.
// Launch limits: block dimensions and size (1024 threads), grid dimensions, shared memory per block
// (static + dynamic, sharedMemPerBlock), __launch_bounds__, and a launch must be checked
// (C10_CUDA_KERNEL_LAUNCH_CHECK) before the next one. Shared memory is fresh for every block and
// filled with 0xFF bytes (NaN as float, double, half, bfloat16), so a read of what no thread of this
// block wrote shows.
//
// Switching: a fiber is created with makecontext and entered the first time with swapcontext; after
// that the scheduler and the fibers switch with GCC's __builtin_setjmp/__builtin_longjmp, which
// save the frame pointer, stack pointer and resume address (the compiler reloads the rest where a
// jump lands), without swapcontext's signal-mask system call (_setjmp/_longjmp were about 20x faster
// than swapcontext; the fibers never change the signal mask). Built-ins rather than _longjmp: the
// sanitizers intercept _longjmp, and ASan's interceptor made a system call (sigaltstack) and
// unpoisoned stacks at every switch, a third of the asan run's time (perf).
//
// Schedules (the order in which a pass runs the runnable threads): "forward" (index order),
// "reverse", "lagging" (index order, but one warp runs only when no other thread can, so that the
// others race ahead of it to the next barrier), "random" (an order drawn for every pass from the
// seed), and "alternate" (the default): forward, reverse and lagging by turns, block by block, the
// lagging warp rotating. A missing barrier shows in one order or another.
//
// Race detection (the "tsan" build, compiled with -fsanitize=thread): a missing barrier whose
// values come out right in every order (a write that can only follow the read it clobbers in the
// fibers' order) is still a data race. Under ThreadSanitizer each warp of the block is a TSan
// fiber (its lanes' fibers run as that one TSan thread), and the engine tells TSan exactly the
// synchronization __syncthreads gives, no more:
//   - every thread releases the block's barrier token on arrival and acquires it when the barrier
//     completes (two tokens by turns, so a warp that runs ahead to the next barrier cannot leak its
//     later writes to a warp that has not left this one);
//   - switches: into a fiber with synchronization (the host's writes and earlier blocks happen
//     before), back to the scheduler without (a switch is not a synchronization on a GPU); a
//     thread that exits releases the block's end token, which the scheduler acquires after the
//     block (blocks run one after another: races between blocks are out of reach);
//   - the engine's own bookkeeping is not the kernel's: the functions the fibers call are compiled
//     without TSan's instrumentation (EMU_ENGINE), the scheduler runs with tracking off
//     (IgnoreAccesses; not in the fibers: TSan records the call stack of each such call, and the
//     lanes of a warp share one interleaved shadow stack, so every record was new: ~32 MB a block).
// So TSan reports two warps of a block touching a byte, one of them writing, with no barrier
// between them. A TSan thread per warp, not per CUDA thread: TSan's runtime has 256 thread slots,
// and a block's 256-1024 fibers taking them in turns made every switch a slot change (a 147-case
// selection ran for over 25 minutes); lanes of one warp exchange data through shuffles here.
// Fibers rather than OS threads: with OS threads the engine's state needs a lock, and a lock taken
// at every barrier and shuffle would order all threads of the block, hiding the races sought.
#include "emu_cuda.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

namespace emu {

// The engine's functions that fibers call, and the switches: not instrumented by TSan (their
// accesses are the engine's, not the kernel's; an instrumented function that switches fibers would
// record its entry on one TSan thread's shadow stack and its exit on another's). They must not
// write shared engine state through instrumented or intercepted calls (memset, std::string,
// device_properties()): only their error paths build strings, and an error ends the launch.
// Nor by ASan, whose subject is the kernels too: it calls __asan_handle_no_return before every
// call of a noreturn function, and so at every switch (a sigaltstack system call and a stack's
// shadow unpoisoned each time: a third of the asan run, perf).
#define EMU_ENGINE __attribute__((no_sanitize("thread", "address")))

// ThreadSanitizer's view of the engine's synchronization (no-ops in the other builds).
namespace race {
#if defined(__SANITIZE_THREAD__)
EMU_ENGINE inline void* new_fiber() { return __tsan_create_fiber(0); }
EMU_ENGINE inline void delete_fiber(void* f) { __tsan_destroy_fiber(f); }
EMU_ENGINE inline void* current_fiber() { return __tsan_get_current_fiber(); }
// Into a kernel fiber: what the scheduler did happens before what the fiber does next.
EMU_ENGINE inline void enter(void* fiber) { __tsan_switch_to_fiber(fiber, 0); }
// Back to the scheduler: no synchronization.
EMU_ENGINE inline void leave_to(void* scheduler) { __tsan_switch_to_fiber(scheduler, __tsan_switch_to_fiber_no_sync); }
EMU_ENGINE inline void release(void* token) { __tsan_release(token); }
EMU_ENGINE inline void acquire(void* token) { __tsan_acquire(token); }
struct IgnoreAccesses {  // the scheduler's bookkeeping: not the kernel's accesses
  IgnoreAccesses() { __tsan_ignore_thread_begin(); }
  ~IgnoreAccesses() { __tsan_ignore_thread_end(); }
};
#else
inline void* new_fiber() { return nullptr; }
inline void delete_fiber(void*) {}
inline void* current_fiber() { return nullptr; }
inline void enter(void*) {}
inline void leave_to(void*) {}
inline void release(void*) {}
inline void acquire(void*) {}
struct IgnoreAccesses {
  IgnoreAccesses() {}  // user-provided: no unused-variable warning
};
#endif
}  // namespace race

thread_local const ThreadView* tls_thread = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kSharedCapacity = 256 * 1024;

enum class State { kReady, kBarrier, kCollective, kDone };

struct Thread : ThreadView {
  int linear = 0;
  State state = State::kReady;
  const char* file = "";
  int line = 0;
  Collective kind = Collective::kSync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int bytes = 0, arg = 0, width = 32;
  struct Fiber* fiber = nullptr;
};

// What __builtin_setjmp saves (five words, GCC's documentation).
using JumpBuffer = void* [5];

// A fiber runs the kernel for one thread index, block after block and launch after launch: after
// a thread exits, its fiber waits at the bottom of trampoline() for the next block.
struct Fiber {
  ucontext_t context;
  JumpBuffer jump;
  bool started = false;
  char* stack = nullptr;
};

struct StaticShared {
  const char* key;  // "file:line:name", a string literal
  size_t offset;
};
constexpr int kMaxStatics = 64;

struct Engine {
  Settings settings;
  std::vector<Settings> devices{Settings{}};  // distinct settings seen: the device index
  Stats stats;
  std::vector<LaunchRecord> log;
  // The launch in progress.
  bool running = false;
  bool unchecked = false;
  std::string unchecked_kernel;
  const LaunchConfig* config = nullptr;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  BlockView block;
  std::vector<Thread> threads;
  std::vector<Fiber*> fibers;
  std::vector<int> order;  // the current pass's thread order
  std::vector<unsigned> warp_waiting;  // per warp: lanes waiting at a collective
  int barrier_waiting = 0;             // threads waiting at __syncthreads
  bool barrier_mismatch = false;       // ... at different call sites
  const char* barrier_file = "";       // where the first of them waits
  int barrier_line = 0;
  Thread* current = nullptr;
  int done = 0;
  ucontext_t scheduler;
  JumpBuffer scheduler_jump;
  std::string error;
  unsigned char* shared = nullptr;
  size_t shared_dirty = 0;
  size_t dynamic_bytes = 0;
  size_t static_end = 0;
  StaticShared statics[kMaxStatics];  // this block's __shared__ variables, in the order first reached
  int static_count = 0;
  cudaDeviceProp properties;
  // Race detection: the scheduler's TSan fiber, the warps' (one each), the barrier tokens (by turns:
  // the parity of the block's completed barriers), the token exiting threads release.
  void* race_scheduler = nullptr;
  std::vector<void*> race_warps;
  unsigned block_barriers = 0;
  char barrier_tokens[2] = {0, 0};
  char block_end_token = 0;
};

Engine& engine() {
  static Engine* e = new Engine();  // never destroyed: fibers' stacks may outlive static destruction
  return *e;
}

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

std::string where(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}
std::string dims(uint3 d) { return dims(dim3(d)); }

std::string thread_name(const Thread& t) { return "thread " + dims(t.thread_idx) + " (warp " +
                                                   std::to_string(t.linear / 32) + ", lane " +
                                                   std::to_string(t.linear % 32) + ")"; }

const char* kind_name(Collective k) {
  switch (k) {
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kShflUp: return "__shfl_up_sync";
    case Collective::kShflDown: return "__shfl_down_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kBallot: return "__ballot_sync";
    case Collective::kSync: return "__syncwarp";
  }
  return "?";
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::string waiting_at(const Thread& t) {
  switch (t.state) {
    case State::kReady: return "runnable";
    case State::kDone: return "exited";
    case State::kBarrier: return "__syncthreads() at " + where(t.file, t.line);
    case State::kCollective:
      return std::string(kind_name(t.kind)) + "(mask " + hex(t.mask) + ") at " + where(t.file, t.line);
  }
  return "?";
}

[[noreturn]] void throw_error(const std::string& what) {
  Engine& e = engine();
  std::string message = "CUDA emulation: ";
  if (e.config != nullptr) {
    message += "kernel " + std::string(e.config->kernel) + " <<<grid " + dims(e.config->grid) + ", block " +
               dims(e.config->block) + ", shared " + std::to_string(e.config->dynamic_shared) + ">>>";
    if (e.running) message += ", block " + dims(e.block.block_idx);
    message += ": ";
  }
  message += what;
  throw std::runtime_error(message);
}

EMU_ENGINE Thread& self(const char* what) {
  Engine& e = engine();
  if (e.current == nullptr || tls_thread != e.current) {
    throw std::runtime_error(std::string("CUDA emulation: ") + what + " called outside a kernel");
  }
  return *e.current;
}

// Resumes where `to` was saved by __builtin_setjmp, which returns 1 there. Out of line: the built-in
// longjmp may not be called from the function that called the built-in setjmp. Not declared
// noreturn, and kept out of interprocedural analysis (noipa), which would find it noreturn: the
// scheduler (run_block, instrumented) calls it, and ASan would call __asan_handle_no_return first.
__attribute__((noinline, noipa)) EMU_ENGINE void jump_to(JumpBuffer& to) { __builtin_longjmp(to, 1); }

// Back to the scheduler until the engine resumes this thread.
EMU_ENGINE void yield(Thread& t, State state) {
  t.state = state;
  if (__builtin_setjmp(t.fiber->jump) == 0) {
    race::leave_to(engine().race_scheduler);
    jump_to(engine().scheduler_jump);
  }
}

// Back to the scheduler for good.
[[noreturn]] EMU_ENGINE void leave() {
  Engine& e = engine();
  race::release(&e.block_end_token);
  race::leave_to(e.race_scheduler);
  jump_to(e.scheduler_jump);
  __builtin_unreachable();
}

EMU_ENGINE void trampoline() {
  for (;;) {
    Engine& e = engine();
    Thread* t = e.current;
    try {
      e.body(e.closure);
    } catch (const std::exception& ex) {
      if (e.error.empty()) e.error = thread_name(*t) + " threw: " + ex.what();
    } catch (...) {
      if (e.error.empty()) e.error = thread_name(*t) + " threw an unknown exception";
    }
    t->state = State::kDone;
    ++e.done;
    if (__builtin_setjmp(t->fiber->jump) == 0) leave();
    // resumed as the thread of the same index of the next block
  }
}

char* new_stack() {
  void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map a fiber stack");
  mprotect(p, kGuardBytes, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  return static_cast<char*>(p) + kGuardBytes;
}

// Lane b's source lane for a shuffle, or -1 when it keeps its own value.
EMU_ENGINE int source_lane(const Thread& t, int lane) {
  const int w = t.width, base = lane / w * w;
  switch (t.kind) {
    case Collective::kShflIdx: return base + (t.arg % w + w) % w;
    case Collective::kShflUp: return lane % w >= t.arg ? lane - t.arg : lane;
    case Collective::kShflDown: return lane % w + t.arg < w ? lane + t.arg : lane;
    case Collective::kShflXor: {
      const int src = lane ^ t.arg;
      return src / w == lane / w && src < 32 ? src : lane;
    }
    default: return -1;
  }
}

// Fails the launch: from a fiber, through the scheduler (which throws); from the scheduler, directly.
[[noreturn]] EMU_ENGINE void report(const std::string& what) {
  Engine& e = engine();
  if (e.current != nullptr && tls_thread == e.current) {
    if (e.error.empty()) e.error = what;
    e.current->state = State::kDone;
    ++e.done;
    leave();
  }
  throw_error(what);
}

// Whether every lane of t's mask waits at the same collective as t.
EMU_ENGINE bool group_complete(int warp, const Thread& t) {
  Engine& e = engine();
  const int n = static_cast<int>(e.threads.size());
  for (int b = 0; b < 32; ++b) {
    if (!(t.mask >> b & 1u)) continue;
    const int j = warp * 32 + b;
    if (j >= n) return false;
    const Thread& u = e.threads[j];
    if (u.state != State::kCollective || u.kind != t.kind || u.mask != t.mask || u.width != t.width ||
        u.bytes != t.bytes) {
      return false;
    }
  }
  return true;
}

// Exchanges the values of t's (complete) group and makes its lanes runnable.
EMU_ENGINE void exchange(int warp, const Thread& t) {
  Engine& e = engine();
  for (int b = 0; b < 32; ++b) {
    if (!(t.mask >> b & 1u)) continue;
    Thread& u = e.threads[warp * 32 + b];
    if (t.kind == Collective::kBallot) {
      uint64_t votes = 0;
      for (int c = 0; c < 32; ++c) {
        if ((t.mask >> c & 1u) && e.threads[warp * 32 + c].value != 0) votes |= uint64_t(1) << c;
      }
      u.result = votes;
    } else if (t.kind == Collective::kSync) {
      u.result = 0;
    } else {
      const int src = source_lane(u, b);
      if (src != b && !(t.mask >> src & 1u)) {
        report(thread_name(u) + " at " + waiting_at(u) + " reads lane " + std::to_string(src) +
               ", which is not in the mask (undefined on a GPU)");
      }
      u.result = e.threads[warp * 32 + src].value;
    }
  }
  for (int b = 0; b < 32; ++b) {
    if (t.mask >> b & 1u) e.threads[warp * 32 + b].state = State::kReady;
  }
  e.warp_waiting[warp] &= ~t.mask;
  ++e.stats.collectives;
}

// Completes the warp collectives whose lanes are all there (the last lane to arrive completes its
// collective itself; this is the scheduler's fallback); returns whether any did. When none can and
// `diagnose`, throws what blocks the first one.
bool resolve_collectives(bool diagnose) {
  Engine& e = engine();
  const int n = static_cast<int>(e.threads.size());
  bool released = false;
  for (int i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    if (t.state != State::kCollective) continue;
    const int warp = i / 32;
    if (group_complete(warp, t)) {
      exchange(warp, t);
      released = true;
      continue;
    }
    if (!diagnose) continue;
    std::string problem;
    for (int b = 0; b < 32 && problem.empty(); ++b) {
      if (!(t.mask >> b & 1u)) continue;
      const int j = warp * 32 + b;
      if (j >= n) {
        problem = "its mask names lane " + std::to_string(b) + ", which the block (" + std::to_string(n) +
                  " threads) does not have";
        break;
      }
      const Thread& u = e.threads[j];
      if (u.state == State::kDone) {
        problem = "its mask names lane " + std::to_string(b) + ", which has exited";
      } else if (u.state == State::kBarrier) {
        problem = "its mask names lane " + std::to_string(b) + ", which waits at " + waiting_at(u);
      } else if (u.state == State::kCollective &&
                 (u.kind != t.kind || u.mask != t.mask || u.width != t.width || u.bytes != t.bytes)) {
        problem = "lane " + std::to_string(b) + " of its mask waits at " + waiting_at(u) + " instead";
      } else if (u.state != State::kCollective) {
        problem = "lane " + std::to_string(b) + " of its mask is " + waiting_at(u);
      }
    }
    throw_error(thread_name(t) + " waits at " + waiting_at(t) + ", but " + problem +
                " (on a GPU: undefined behaviour or a hang)");
  }
  return released;
}

// Every thread of the block has arrived at one __syncthreads(): all run again, and the barrier
// tokens move to the other parity (race::, TSan's view of the barrier).
EMU_ENGINE void complete_barrier(Engine& e) {
  for (auto& t : e.threads) t.state = State::kReady;
  e.barrier_waiting = 0;
  ++e.block_barriers;
  ++e.stats.barriers;
}

void resolve() {
  Engine& e = engine();
  bool any_collective = false, any_barrier = false;
  for (const auto& t : e.threads) {
    any_collective |= t.state == State::kCollective;
    any_barrier |= t.state == State::kBarrier;
  }
  if (any_collective) {
    if (resolve_collectives(false)) return;
    resolve_collectives(true);  // throws why none can complete
    throw_error("deadlock in warp collectives");
  }
  if (!any_barrier) throw_error("deadlock: no thread can run");
  const Thread* first = nullptr;
  const Thread* exited = nullptr;
  for (const auto& t : e.threads) {
    if (t.state == State::kDone && exited == nullptr) exited = &t;
    if (t.state != State::kBarrier) continue;
    if (first == nullptr) {
      first = &t;
    } else if (t.line != first->line || std::strcmp(t.file, first->file) != 0) {
      throw_error("threads of one block reach different __syncthreads(): " + thread_name(*first) + " at " +
                  where(first->file, first->line) + ", " + thread_name(t) + " at " + where(t.file, t.line) +
                  " (undefined on a GPU)");
    }
  }
  if (exited != nullptr) {
    throw_error(std::to_string(e.threads.size() - e.done) + " threads wait at __syncthreads() at " +
                where(first->file, first->line) + " after " + std::to_string(e.done) + " threads exited (e.g. " +
                thread_name(*exited) + "): undefined on a GPU");
  }
  complete_barrier(e);
}

// Thread order of one scheduler pass: forward, reverse, or a permutation drawn from `seed`.
void pass_order(std::vector<int>& order, int n, Schedule schedule, bool reverse, uint64_t& seed) {
  order.resize(n);
  for (int k = 0; k < n; ++k) order[k] = reverse ? n - 1 - k : k;
  if (schedule != Schedule::kRandom) return;
  for (int k = n - 1; k > 0; --k) {  // Fisher-Yates with xorshift64
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    std::swap(order[k], order[seed % uint64_t(k + 1)]);
  }
}

// victim >= 0: the warp that runs only when no other thread can (it lags behind the others).
void run_block(uint3 index, bool reverse, uint64_t seed, int victim) {
  race::IgnoreAccesses untracked;  // the scheduler's bookkeeping (what the fibers read switches with them)
  Engine& e = engine();
  e.block.block_idx = index;
  // Fresh shared memory: every byte this launch may read is NaN again.
  std::memset(e.shared, 0xFF, std::max(e.shared_dirty, e.dynamic_bytes));
  e.shared_dirty = std::max(e.shared_dirty, e.dynamic_bytes);
  e.static_count = 0;
  e.static_end = (e.dynamic_bytes + 15) / 16 * 16;
  e.done = 0;
  const int n = static_cast<int>(e.threads.size());
  e.warp_waiting.assign((n + 31) / 32, 0u);
  e.barrier_waiting = 0;
  e.barrier_mismatch = false;
  e.block_barriers = 0;
  const dim3 bd = e.config->block;
  for (int i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    t.thread_idx = uint3{i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y)};
    t.block = &e.block;
    t.linear = i;
    t.state = State::kReady;
    t.fiber = e.fibers[i];
  }
  ++e.stats.blocks;
  e.stats.threads += n;
  std::vector<int>& order = e.order;
  bool victims_turn = false;
  while (e.done < n) {
    pass_order(order, n, e.settings.schedule, reverse, seed);
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      Thread& t = e.threads[order[k]];
      if (t.state != State::kReady) continue;
      if (t.linear / 32 == victim && !victims_turn) continue;
      ran = true;
      e.current = &t;
      tls_thread = &t;
      if (__builtin_setjmp(e.scheduler_jump) == 0) {
        Fiber& f = *t.fiber;
        race::enter(e.race_warps[t.linear / 32]);
        if (f.started) jump_to(f.jump);
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, trampoline, 0);
        f.started = true;
        swapcontext(&e.scheduler, &f.context);  // first entry; it comes back by jump_to
      }
      e.current = nullptr;
      tls_thread = nullptr;
      if (!e.error.empty()) throw_error(e.error);
    }
    if (victim >= 0) {
      if (!ran && !victims_turn) {
        victims_turn = true;  // nothing else can run: the lagging warp's turn
        continue;
      }
      victims_turn = false;
    }
    // Threads released during the pass (by the last to arrive at a barrier or collective) run in
    // the next; when none can run, resolve() completes what is complete or says what is wrong.
    if (e.done < n && std::none_of(e.threads.begin(), e.threads.end(),
                                   [](const Thread& t) { return t.state == State::kReady; })) {
      resolve();
    }
  }
  race::acquire(&e.block_end_token);  // the block's accesses happen before the next block's
}

void check_config(const LaunchConfig& c) {
  const cudaDeviceProp& p = *device_properties();
  const auto bad = [&](const std::string& why) { throw_error("invalid configuration argument: " + why); };
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0) bad("empty block");
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) bad("empty grid");
  if (c.block.x > unsigned(p.maxThreadsDim[0]) || c.block.y > unsigned(p.maxThreadsDim[1]) ||
      c.block.z > unsigned(p.maxThreadsDim[2])) {
    bad("block dimensions beyond " + dims(dim3(p.maxThreadsDim[0], p.maxThreadsDim[1], p.maxThreadsDim[2])));
  }
  if (uint64_t(c.block.x) * c.block.y * c.block.z > uint64_t(p.maxThreadsPerBlock)) {
    bad("more than " + std::to_string(p.maxThreadsPerBlock) + " threads per block");
  }
  if (c.grid.x > unsigned(p.maxGridSize[0]) || c.grid.y > unsigned(p.maxGridSize[1]) ||
      c.grid.z > unsigned(p.maxGridSize[2])) {
    bad("grid dimensions beyond " + dims(dim3(p.maxGridSize[0], p.maxGridSize[1], p.maxGridSize[2])));
  }
  if (c.dynamic_shared > p.sharedMemPerBlock) {
    bad(std::to_string(c.dynamic_shared) + " bytes of dynamic shared memory, more than the " +
        std::to_string(p.sharedMemPerBlock) + " a block may have without cudaFuncSetAttribute");
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Called by kernels
// ------------------------------------------------------------------------------------------------

[[noreturn]] EMU_ENGINE void fail(const char* what, const char* file, int line) {
  Engine& e = engine();
  if (e.current == nullptr) throw_error(std::string(what) + " at " + where(file, line));
  Thread& t = *e.current;
  if (e.error.empty()) e.error = thread_name(t) + ": " + what + " at " + where(file, line);
  t.state = State::kDone;
  ++e.done;
  leave();
}

EMU_ENGINE void syncthreads(const char* file, int line) {
  Thread& t = self("__syncthreads");
  Engine& e = engine();
  void* token = &e.barrier_tokens[e.block_barriers & 1u];
  race::release(token);
  t.file = file;
  t.line = line;
  t.state = State::kBarrier;
  if (e.barrier_waiting++ == 0) {
    e.barrier_mismatch = false;
    e.barrier_file = file;
    e.barrier_line = line;
  } else {
    e.barrier_mismatch |= e.barrier_line != line || std::strcmp(e.barrier_file, file) != 0;
  }
  if (e.barrier_waiting == static_cast<int>(e.threads.size()) && !e.barrier_mismatch) {
    // The last thread to arrive releases the block (resolve() diagnoses everything else).
    complete_barrier(e);
    race::acquire(token);
    return;
  }
  yield(t, State::kBarrier);
  race::acquire(token);
}

EMU_ENGINE uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int bytes, int arg, int width,
                         const char* file, int line) {
  Thread& t = self(kind_name(kind));
  const int lane = t.linear % 32;
  if (!(mask >> lane & 1u)) {
    fail((std::string(kind_name(kind)) + " with mask " + hex(mask) + ", which does not name the calling lane " +
          std::to_string(lane) + " (undefined on a GPU)").c_str(), file, line);
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail((std::string(kind_name(kind)) + " with width " + std::to_string(width) + ": not a power of 2 up to 32").c_str(),
         file, line);
  }
  t.kind = kind;
  t.mask = mask;
  t.value = value;
  t.bytes = bytes;
  t.arg = arg;
  t.width = width;
  t.file = file;
  t.line = line;
  t.state = State::kCollective;
  Engine& e = engine();
  const int warp = t.linear / 32;
  e.warp_waiting[warp] |= 1u << lane;
  if ((e.warp_waiting[warp] & mask) == mask && group_complete(warp, t)) {
    exchange(warp, t);  // the last lane to arrive completes the collective
    return t.result;
  }
  yield(t, State::kCollective);
  return t.result;
}

EMU_ENGINE void syncwarp(unsigned mask, const char* file, int line) {
  warp_collective(Collective::kSync, mask, 0, 0, 0, 32, file, line);
}

EMU_ENGINE void* static_shared_bytes(const char* key, size_t bytes, size_t align) {
  Engine& e = engine();
  self("__shared__");
  for (int i = 0; i < e.static_count; ++i) {
    if (std::strcmp(e.statics[i].key, key) == 0) return e.shared + e.statics[i].offset;
  }
  if (e.static_count == kMaxStatics) fail("more than 64 __shared__ variables in one kernel", __FILE__, __LINE__);
  const size_t offset = (e.static_end + align - 1) / align * align;
  const size_t limit = e.settings.shared_per_block;  // (device_properties() writes e.properties)
  if (offset + bytes > limit) {
    fail(("__shared__ " + std::string(key) + " (" + std::to_string(bytes) + " bytes) takes the block's shared memory to " +
          std::to_string(offset + bytes) + " bytes (" + std::to_string(e.dynamic_bytes) + " dynamic), beyond " +
          std::to_string(limit)).c_str(), __FILE__, __LINE__);
  }
  e.statics[e.static_count++] = {key, offset};
  e.static_end = offset + bytes;
  if (e.static_end > e.shared_dirty) {
    // Poisoned byte by byte, not by memset: TSan intercepts memset whatever no_sanitize says, and
    // would charge the write to this warp (volatile: the loop must not become a memset call).
    volatile unsigned char* fresh = e.shared + e.shared_dirty;
    for (size_t k = 0; k < e.static_end - e.shared_dirty; ++k) fresh[k] = 0xFF;
    e.shared_dirty = e.static_end;
  }
  e.stats.max_shared = std::max<uint64_t>(e.stats.max_shared, e.static_end);
  return e.shared + offset;
}

EMU_ENGINE void* dynamic_shared_bytes(size_t align) {
  Engine& e = engine();
  self("extern __shared__");
  if (align > 128) fail("extern __shared__ aligned beyond 128 bytes", __FILE__, __LINE__);
  return e.shared;
}

EMU_ENGINE void check_launch_bounds(int max_threads, const char* file, int line, const char* instance) {
  const dim3 b = self("__launch_bounds__").block->block_dim;
  Engine& e = engine();
  if (e.log.back().instance.empty()) e.log.back().instance = instance;  // (run_grid's record)
  if (int64_t(b.x) * b.y * b.z > max_threads) {
    fail(("launched with " + std::to_string(int64_t(b.x) * b.y * b.z) + " threads per block, more than its __launch_bounds__(" +
          std::to_string(max_threads) + ") (on a GPU: too many resources requested for launch)").c_str(), file, line);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

cudaDeviceProp* device_properties() {
  Engine& e = engine();
  cudaDeviceProp& p = e.properties;
  std::memset(&p, 0, sizeof(p));
  std::snprintf(p.name, sizeof(p.name), "CUDA emulation (%d SMs)", e.settings.sm_count);
  p.major = 9;
  p.minor = 0;
  p.multiProcessorCount = e.settings.sm_count;
  p.maxThreadsPerBlock = 1024;
  p.maxThreadsDim[0] = 1024;
  p.maxThreadsDim[1] = 1024;
  p.maxThreadsDim[2] = 64;
  p.maxGridSize[0] = 2147483647;
  p.maxGridSize[1] = 65535;
  p.maxGridSize[2] = 65535;
  p.sharedMemPerBlock = e.settings.shared_per_block;
  p.sharedMemPerBlockOptin = 227 * 1024;
  p.sharedMemPerMultiprocessor = 228 * 1024;
  p.maxThreadsPerMultiProcessor = 2048;
  p.maxBlocksPerMultiProcessor = 32;
  p.warpSize = 32;
  p.regsPerBlock = 65536;
  return &p;
}

int current_device_index() {
  Engine& e = engine();
  for (size_t i = 0; i < e.devices.size(); ++i) {
    const Settings& s = e.devices[i];
    if (s.sm_count == e.settings.sm_count && s.blocks_per_sm == e.settings.blocks_per_sm &&
        s.shared_per_block == e.settings.shared_per_block) {
      return static_cast<int>(i);
    }
  }
  if (e.devices.size() >= 127) throw std::runtime_error("CUDA emulation: more than 127 device settings");
  e.devices.push_back(e.settings);
  return static_cast<int>(e.devices.size() - 1);
}

int occupancy_blocks_per_sm(int block_threads, size_t dynamic_shared) {
  Engine& e = engine();
  ++e.stats.occupancy_queries;
  if (e.settings.blocks_per_sm > 0) return e.settings.blocks_per_sm;
  const int warps = (block_threads + 31) / 32;
  int blocks = std::min(32, 64 / std::max(warps, 1));
  if (dynamic_shared > 0) blocks = std::min<int>(blocks, (228 * 1024) / int(dynamic_shared + 1024));
  return std::max(blocks, 0);
}

void launch_checked() { engine().unchecked = false; }

void run_grid(const LaunchConfig& config, void (*body)(void*), void* closure) {
  race::IgnoreAccesses untracked;  // the engine's state (the kernel's arguments were written before)
  std::lock_guard<std::mutex> lock(launch_mutex());
  Engine& e = engine();
  if (e.running) throw std::runtime_error("CUDA emulation: a kernel launched from a kernel");
  if (e.unchecked) {
    const std::string previous = e.unchecked_kernel;
    e.unchecked = false;
    throw std::runtime_error("CUDA emulation: the launch of " + previous +
                             " was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK()");
  }
  struct Reset {
    Engine& e;
    ~Reset() {
      if (!e.error.empty() || std::uncaught_exceptions() > 0) {
        for (Fiber* f : e.fibers) f->started = false;  // abandoned mid-kernel: start afresh
        for (void*& w : e.race_warps) {  // (their TSan state may be left mid-engine)
          race::delete_fiber(w);
          w = race::new_fiber();
        }
        race::acquire(&e.block_end_token);  // the abandoned block's accesses before the next launch's
      }
      e.running = false;
      e.config = nullptr;
      e.current = nullptr;
      tls_thread = nullptr;
      e.error.clear();
    }
  } reset{e};
  e.config = &config;
  e.error.clear();
  e.race_scheduler = race::current_fiber();
  check_config(config);
  e.body = body;
  e.closure = closure;
  e.block.block_dim = config.block;
  e.block.grid_dim = config.grid;
  e.dynamic_bytes = config.dynamic_shared;
  if (e.shared == nullptr) {
    e.shared = static_cast<unsigned char*>(std::aligned_alloc(128, kSharedCapacity));
    std::memset(e.shared, 0xFF, kSharedCapacity);
  }
  const size_t n = size_t(config.block.x) * config.block.y * config.block.z;
  while (e.fibers.size() < n) {
    e.fibers.push_back(new Fiber());
    e.fibers.back()->stack = new_stack();
  }
  while (e.race_warps.size() < (n + 31) / 32) e.race_warps.push_back(race::new_fiber());
  e.threads.assign(n, Thread{});
  ++e.stats.launches;
  e.log.push_back({config.kernel, config.grid, config.block, config.dynamic_shared});
  if (e.log.size() > 4096) e.log.erase(e.log.begin(), e.log.begin() + 2048);
  e.running = true;
  uint64_t index = 0;
  for (unsigned z = 0; z < config.grid.z; ++z) {
    for (unsigned y = 0; y < config.grid.y; ++y) {
      for (unsigned x = 0; x < config.grid.x; ++x, ++index) {
        const Schedule schedule = e.settings.schedule;
        const bool reverse = schedule == Schedule::kReverse || (schedule == Schedule::kAlternate && index % 3 == 1);
        const int warps = static_cast<int>((n + 31) / 32);
        const int victim = schedule == Schedule::kLagging || (schedule == Schedule::kAlternate && index % 3 == 2)
                               ? static_cast<int>((index / 3 + e.settings.seed) % warps)
                               : -1;
        const uint64_t seed = (e.settings.seed + 1) * 0x9E3779B97F4A7C15ull + index * 0xBF58476D1CE4E5B9ull;
        run_block(uint3{x, y, z}, reverse, seed | 1, victim);  // xorshift needs a nonzero state
      }
    }
  }
  e.unchecked = true;
  e.unchecked_kernel = config.kernel;
}

// ------------------------------------------------------------------------------------------------
// Settings and statistics (engine.h, for the bindings)
// ------------------------------------------------------------------------------------------------

Settings& settings() { return engine().settings; }
Stats& stats() { return engine().stats; }
std::vector<LaunchRecord>& launch_log() { return engine().log; }
bool take_unchecked() {
  Engine& e = engine();
  const bool was = e.unchecked;
  e.unchecked = false;
  return was;
}

}  // namespace emu
