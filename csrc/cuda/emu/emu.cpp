// emu.cpp: the CUDA emulator's scheduler (see cuda_runtime.h for what it
// provides and enforces).
//
// A block runs on the launching host thread: each of its CUDA threads is a
// fiber with a stack of its own, and the scheduler sweeps the fibers in thread
// order, resuming every one that can proceed. A fiber runs until it reaches a
// barrier (__syncthreads) or a warp shuffle whose other lanes have not all
// arrived, or until it returns. The fiber that completes a barrier or a
// shuffle goes on running; the others resume in the next sweep. A sweep in
// which no fiber can proceed is a deadlock: it aborts with every thread's
// state. Blocks run one after another, in blockIdx order (x fastest).
//
// The environment variable PYREG_EMU_ORDER, read at each launch, changes the
// order of the sweeps and of the blocks: "forward" (the default, as above),
// "reverse" (highest thread and block first) or "random" / "random:SEED"
// (a random order of the threads of each block and of the blocks, from a
// generator seeded with SEED, default 1, at the first launch that sees the
// value). A GPU runs warps and blocks in no promised order: a kernel whose
// result changes with the order has a race (e.g. a read of shared memory that
// another thread writes with no barrier between), which forward order alone
// can hide.
//
// Context switches are a few instructions on x86-64 (hand-written, callee-
// saved registers and the FP control words only); elsewhere ucontext, which
// is slower but portable (other CPUs, macOS).
#include "cuda_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <algorithm>
#include <numeric>
#include <cstdlib>
#include <string>
#include <vector>

// The hand-written switch on x86-64 ELF systems (Linux, BSDs); ucontext
// elsewhere, or everywhere with -DPYREG_EMU_UCONTEXT.
#if defined(__x86_64__) && defined(__ELF__) && !defined(PYREG_EMU_UCONTEXT)
#define PYREG_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace pyreg::emu {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;  // per CUDA thread; touched pages only

// ---- fibers -------------------------------------------------------------------
#if defined(PYREG_EMU_ASM_SWITCH)
extern "C" void pyreg_emu_switch(void** save_sp, void* load_sp);
extern "C" void pyreg_emu_start();
// pyreg_emu_switch saves rbp, rbx and r12-r15 on the current stack, stores
// the stack pointer at *save_sp, and restores the same from load_sp. A new
// fiber's stack is laid out so that the restore "returns" into
// pyreg_emu_start with r12 = argument and r13 = entry point. The FP control
// words (MXCSR, x87) are not switched: every fiber runs on the launching host
// thread, and kernels do not change them.
asm(R"(
  .text
  .p2align 4
  .globl pyreg_emu_switch
  .hidden pyreg_emu_switch
  .type pyreg_emu_switch, @function
pyreg_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pyreg_emu_switch, .-pyreg_emu_switch

  .p2align 4
  .globl pyreg_emu_start
  .hidden pyreg_emu_start
  .type pyreg_emu_start, @function
pyreg_emu_start:
  endbr64
  movq %r12, %rdi
  callq *%r13
  ud2
  .size pyreg_emu_start, .-pyreg_emu_start
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_to(Context& from, Context& to) { pyreg_emu_switch(&from.sp, to.sp); }

void make_context(Context& c, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  // After the 6 pops and the ret, rsp = s + 56 must be 16-byte aligned, as
  // at a call: pyreg_emu_start's call then enters `entry` as the ABI wants.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top - 72);  // s + 56 = top - 16
  s[0] = 0;                                      // r15
  s[1] = 0;                                      // r14
  s[2] = reinterpret_cast<uint64_t>(entry);      // r13
  s[3] = reinterpret_cast<uint64_t>(arg);        // r12
  s[4] = 0;                                      // rbx
  s[5] = 0;                                      // rbp
  s[6] = reinterpret_cast<uint64_t>(&pyreg_emu_start);  // return address
  c.sp = s;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

thread_local void (*g_entry)(void*);  // makecontext passes ints only: entry and argument go here
thread_local void* tl_arg;
void trampoline() { g_entry(tl_arg); }

void make_context(Context& c, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  g_entry = entry;
  (void)arg;
  makecontext(&c.uc, trampoline, 0);
}
#endif

// ---- order of threads and blocks ----------------------------------------------
enum class OrderKind : uint8_t { kForward, kReverse, kRandom };

struct Order {
  OrderKind kind = OrderKind::kForward;
  uint64_t rng = 0;  // splitmix64 state (random order)
  std::string text;  // the value of PYREG_EMU_ORDER it was parsed from
  uint64_t next() {
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return n <= 1 ? 0 : next() % n; }  // bias is irrelevant here
};
thread_local Order tl_order;

// Reads PYREG_EMU_ORDER; a value it does not know aborts (a typo must not
// quietly test the default order).
void read_order() {
  const char* env = std::getenv("PYREG_EMU_ORDER");
  const std::string v = env != nullptr ? env : "";
  Order& o = tl_order;
  if (v == o.text) return;  // unchanged (the initial state is forward, text "")
  o.text = v;
  o.rng = 0;
  if (v.empty() || v == "forward") {
    o.kind = OrderKind::kForward;
  } else if (v == "reverse") {
    o.kind = OrderKind::kReverse;
  } else if (v == "random" || v.rfind("random:", 0) == 0) {
    o.kind = OrderKind::kRandom;
    o.rng = 1;
    if (v != "random") {
      char* end = nullptr;
      const unsigned long long seed = std::strtoull(v.c_str() + 7, &end, 10);
      if (end == nullptr || *end != '\0' || end == v.c_str() + 7) {
        std::fprintf(stderr, "pyreg CUDA emulator: PYREG_EMU_ORDER=%s: the seed must be a number\n",
                     v.c_str());
        std::abort();
      }
      o.rng = seed;
    }
  } else {
    std::fprintf(stderr, "pyreg CUDA emulator: PYREG_EMU_ORDER=%s is not forward, reverse, random "
                 "or random:SEED\n", v.c_str());
    std::abort();
  }
}

// ---- state of the running block -----------------------------------------------
enum class State : uint8_t { kReady, kAtBarrier, kAtShuffle, kDone };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  uint3 idx{};
  unsigned warp = 0, lane = 0;
  State state = State::kReady;
  uint64_t wait_gen = 0;  // the barrier or shuffle generation it waits to pass
  uint64_t result = 0;    // its shuffle result
  unsigned prev = 0, next = 0;  // neighbours in the ring of threads that have not returned
};

struct Warp {
  uint64_t gen = 0;        // shuffles completed
  uint32_t arrived = 0;    // lanes in the current shuffle so far
  uint32_t mask = 0;       // the current shuffle's mask
  Shfl kind = Shfl::kIdx;
  int width = 32;
  uint32_t live = 0;       // lanes that exist and have not returned
  uint64_t slot[32] = {};  // payloads of the current shuffle
  int arg[32] = {};        // each lane's source lane / delta / lane mask
};

struct SharedVar {
  const void* p;
  size_t bytes;
  const char* name;
};

struct Block {
  const char* kernel = "";
  dim3 grid, dim;
  uint3 idx{};
  unsigned nthreads = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;  // the threads in sweep order
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  Context sched;
  uint64_t bar_gen = 0;
  unsigned bar_arrived = 0, exited = 0, done = 0;
  std::vector<SharedVar> shared;
  size_t shared_bytes = 0;
};

thread_local Block* tl_block = nullptr;   // the block running on this host thread
thread_local cudaError_t tl_error = cudaSuccess;

// Stacks of this host thread's fibers, kept for its later launches.
struct Stacks {
  std::vector<char*> all;
  char* get(size_t i) {
    while (all.size() <= i) {
      const long page = sysconf(_SC_PAGESIZE);
      void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) {
        std::fprintf(stderr, "pyreg CUDA emulator: cannot map a fiber stack\n");
        std::abort();
      }
      mprotect(m, size_t(page), PROT_NONE);  // guard page: an overflow faults
      all.push_back(static_cast<char*>(m));
    }
    return all[i];
  }
  ~Stacks() {
    for (char* s : all) munmap(s, kStackBytes);
  }
};
thread_local Stacks tl_stacks;

std::string where(const Block& b, const Fiber* f) {
  char buf[256];
  if (f != nullptr)
    std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u) (warp %u, lane %u)",
                  b.kernel, b.idx.x, b.idx.y, b.idx.z, f->idx.x, f->idx.y, f->idx.z, f->warp, f->lane);
  else
    std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", b.kernel, b.idx.x, b.idx.y, b.idx.z);
  return buf;
}

[[noreturn]] void die(const Block& b, const Fiber* f, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "pyreg CUDA emulator: %s [%s]\n", msg, where(b, f).c_str());
  std::fflush(stderr);
  std::abort();
}

Block& running(const char* what) {
  Block* b = tl_block;
  if (b == nullptr || b->current == nullptr) {
    std::fprintf(stderr, "pyreg CUDA emulator: %s outside a kernel\n", what);
    std::abort();
  }
  return *b;
}

inline bool runnable(const Block& b, const Fiber& f) {
  switch (f.state) {
    case State::kReady: return true;
    case State::kAtBarrier: return f.wait_gen != b.bar_gen;
    case State::kAtShuffle: return f.wait_gen != b.warps[f.warp].gen;
    case State::kDone: return false;
  }
  return false;
}

[[noreturn]] void deadlock(Block& b);

// Switches from the running fiber (which has just blocked or returned) straight
// to the next one, in sweep order after it, that can proceed; to the
// scheduler when every thread has returned. None left: a deadlock.
void switch_away(Block& b) {
  Fiber* from = b.current;
  const size_t n = b.fibers.size();
  // The ring holds the threads that have not returned, in sweep order; a
  // returning thread has already left it but still knows its successor.
  unsigned i = from->next;
  for (size_t k = 0; k < n; ++k, i = b.fibers[i].next) {
    Fiber& f = b.fibers[i];
    if (!runnable(b, f)) continue;
    f.state = State::kReady;
    b.current = &f;
#if !defined(PYREG_EMU_ASM_SWITCH)
    tl_arg = &f;
#endif
    switch_to(from->ctx, f.ctx);
    return;
  }
  if (b.done < n) deadlock(b);
  b.current = nullptr;
  switch_to(from->ctx, b.sched);
}

inline void yield(Block& b) { switch_away(b); }

void fiber_main(void* arg) {
  Block& b = *tl_block;
  Fiber& f = *static_cast<Fiber*>(arg);
  b.body(b.ctx);
  // The thread returns.
  f.state = State::kDone;
  ++b.exited;
  ++b.done;
  b.fibers[f.prev].next = f.next;
  b.fibers[f.next].prev = f.prev;
  Warp& w = b.warps[f.warp];
  w.live &= ~(1u << f.lane);
  if (b.bar_arrived > 0)
    die(b, &f, "thread returns while %u threads of the block wait at __syncthreads", b.bar_arrived);
  if (w.arrived != 0 && (w.mask >> f.lane & 1u))
    die(b, &f, "lane returns while lanes 0x%08x of its warp wait for it in a shuffle (mask 0x%08x)",
        w.arrived, w.mask);
  switch_away(b);
  __builtin_unreachable();
}

const char* state_name(State s) {
  switch (s) {
    case State::kReady: return "ready";
    case State::kAtBarrier: return "at __syncthreads";
    case State::kAtShuffle: return "in a shuffle";
    case State::kDone: return "returned";
  }
  return "?";
}

void deadlock(Block& b) {
  // Summarize the states as runs of threads.
  std::string s;
  size_t i = 0;
  while (i < b.fibers.size()) {
    size_t j = i;
    while (j + 1 < b.fibers.size() && b.fibers[j + 1].state == b.fibers[i].state) ++j;
    char buf[128];
    std::snprintf(buf, sizeof buf, "%sthreads %zu-%zu %s", s.empty() ? "" : "; ", i, j,
                  state_name(b.fibers[i].state));
    s += buf;
    if (b.fibers[i].state == State::kAtShuffle) {
      const Warp& w = b.warps[b.fibers[i].warp];
      std::snprintf(buf, sizeof buf, " (mask 0x%08x, arrived 0x%08x)", w.mask, w.arrived);
      s += buf;
    }
    i = j + 1;
  }
  die(b, nullptr, "deadlock: no thread can proceed (diverged barrier or shuffle): %s", s.c_str());
}

void run_block(Block& b) {
  const unsigned n = b.nthreads;
  const unsigned nwarps = (n + 31) / 32;
  b.fibers.resize(n);
  b.warps.assign(nwarps, Warp{});
  for (unsigned w = 0; w < nwarps; ++w) {
    const unsigned lanes = std::min(32u, n - 32 * w);
    b.warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  unsigned t = 0;
  for (unsigned z = 0; z < b.dim.z; ++z)
    for (unsigned y = 0; y < b.dim.y; ++y)
      for (unsigned x = 0; x < b.dim.x; ++x, ++t) {
        Fiber& f = b.fibers[t];
        f.idx = uint3{x, y, z};
        f.warp = t / 32;
        f.lane = t % 32;
        f.state = State::kReady;
        f.wait_gen = 0;
        f.stack = tl_stacks.get(t);
        make_context(f.ctx, f.stack, kStackBytes, fiber_main, &f);
      }
  // The ring of threads in sweep order (PYREG_EMU_ORDER).
  b.order.resize(n);
  for (unsigned i = 0; i < n; ++i) b.order[i] = i;
  if (tl_order.kind == OrderKind::kReverse) {
    std::reverse(b.order.begin(), b.order.end());
  } else if (tl_order.kind == OrderKind::kRandom) {
    for (unsigned i = n; i > 1; --i) std::swap(b.order[i - 1], b.order[tl_order.below(i)]);
  }
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[b.order[i]];
    f.next = b.order[(i + 1) % n];
    f.prev = b.order[(i + n - 1) % n];
  }
  b.bar_gen = 0;
  b.bar_arrived = b.exited = b.done = 0;
  b.shared.clear();
  b.shared_bytes = 0;
  // The first thread of the order first; from there the fibers switch among
  // themselves until the last one returns here.
  b.current = &b.fibers[b.order[0]];
#if !defined(PYREG_EMU_ASM_SWITCH)
  tl_arg = b.current;
#endif
  switch_to(b.sched, b.current->ctx);
  b.current = nullptr;
}

inline int source_lane(Shfl kind, int lane, int arg, int width) {
  const int base = lane & ~(width - 1), pos = lane & (width - 1);
  switch (kind) {
    case Shfl::kIdx: return base + (arg & (width - 1));
    case Shfl::kUp: return pos - arg >= 0 ? lane - arg : lane;
    case Shfl::kDown: return pos + arg < width ? lane + arg : lane;
    case Shfl::kXor: {
      const int s = lane ^ arg;
      return s < base + width ? s : lane;
    }
  }
  return lane;
}

const char* shfl_name(Shfl k) {
  switch (k) {
    case Shfl::kIdx: return "__shfl_sync";
    case Shfl::kUp: return "__shfl_up_sync";
    case Shfl::kDown: return "__shfl_down_sync";
    case Shfl::kXor: return "__shfl_xor_sync";
  }
  return "?";
}

}  // namespace

// ---- the device side ----------------------------------------------------------
const uint3& thread_idx() { return running("threadIdx").current->idx; }
const uint3& block_idx() { return running("blockIdx").idx; }
const dim3& block_dim() { return running("blockDim").dim; }
const dim3& grid_dim() { return running("gridDim").grid; }

void syncthreads() {
  Block& b = running("__syncthreads");
  Fiber& f = *b.current;
  if (b.exited > 0)
    die(b, &f, "__syncthreads after %u threads of the block returned", b.exited);
  if (b.warps[f.warp].arrived != 0)
    die(b, &f, "__syncthreads while lanes 0x%08x of this warp wait in a shuffle",
        b.warps[f.warp].arrived);
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    return;
  }
  f.state = State::kAtBarrier;
  f.wait_gen = b.bar_gen;
  yield(b);
}

uint64_t shfl(Shfl kind, unsigned mask, uint64_t bits, int arg, int width) {
  Block& b = running(shfl_name(kind));
  Fiber& f = *b.current;
  Warp& w = b.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    die(b, &f, "%s with width %d (must be a power of 2 up to 32)", shfl_name(kind), width);
  if (!(mask & bit))
    die(b, &f, "%s with mask 0x%08x, which leaves out the calling lane", shfl_name(kind), mask);
  if (mask & ~w.live)
    die(b, &f, "%s with mask 0x%08x names inactive lanes 0x%08x (returned or outside the block)",
        shfl_name(kind), mask, mask & ~w.live);
  if (w.arrived == 0) {
    w.mask = mask;
    w.kind = kind;
    w.width = width;
  } else if (w.mask != mask || w.kind != kind || w.width != width) {
    die(b, &f, "diverged shuffle: lanes 0x%08x are in %s(mask 0x%08x, width %d), this lane calls "
        "%s(mask 0x%08x, width %d)", w.arrived, shfl_name(w.kind), w.mask, w.width,
        shfl_name(kind), mask, width);
  }
  w.slot[f.lane] = bits;
  w.arg[f.lane] = arg;
  w.arrived |= bit;
  // Each lane's source, read when the call completes.
  auto deliver = [&]() {
    Fiber* lanes = &b.fibers[f.warp * 32];
    for (uint32_t m = mask; m != 0; m &= m - 1) {
      const int l = __builtin_ctz(m);
      const int src = source_lane(kind, l, w.arg[l], width);
      if (!(mask >> src & 1u))
        die(b, &lanes[l], "%s reads lane %d, which is not in its mask 0x%08x", shfl_name(kind), src,
            mask);
      lanes[l].result = w.slot[src];
    }
  };
  if (w.arrived == mask) {
    deliver();
    w.arrived = 0;
    ++w.gen;
    return f.result;
  }
  f.state = State::kAtShuffle;
  f.wait_gen = w.gen;
  yield(b);
  return f.result;
}

void shared_use(const char* name, const void* p, size_t bytes) {
  Block& b = running("shared memory");
  for (const SharedVar& v : b.shared)
    if (v.p == p) return;
  b.shared.push_back(SharedVar{p, bytes, name});
  b.shared_bytes += bytes;
  if (b.shared_bytes > kMaxStaticShared)
    die(b, b.current, "static shared memory of the block is %zu bytes with '%s' (limit %zu)",
        b.shared_bytes, name, kMaxStaticShared);
}

void misaligned_vector(const void* p, size_t align, const char* type, bool store) {
  Block* b = tl_block;
  if (b == nullptr || b->current == nullptr) return;  // host code: not the GPU's rule
  die(*b, b->current, "misaligned %zu-byte %s %s at address %p (not a multiple of %zu; a GPU "
      "faults: misaligned address)", align, type, store ? "store" : "load", p, align);
}

cudaError_t& last_error() { return tl_error; }

// ---- the host side ------------------------------------------------------------
cudaError_t launch_raw(const char* name, dim3 grid, dim3 block, size_t dynamic_shared,
                       void (*body)(void*), void* ctx) {
  if (tl_block != nullptr) {
    std::fprintf(stderr, "pyreg CUDA emulator: launch of %s from inside kernel %s\n", name,
                 tl_block->kernel);
    std::abort();
  }
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ ||
      grid.z > kMaxGridYZ || block.x == 0 || block.y == 0 || block.z == 0 ||
      block.x > kMaxBlockThreads || block.y > kMaxBlockThreads || block.z > kMaxBlockZ ||
      threads > kMaxBlockThreads || dynamic_shared > kMaxStaticShared)
    return cudaErrorInvalidConfiguration;
  read_order();
  static thread_local Block b;
  b.kernel = name;
  b.grid = grid;
  b.dim = block;
  b.nthreads = unsigned(threads);
  b.body = body;
  b.ctx = ctx;
  tl_block = &b;
  // Block k of the order is block j = (a * k + c) mod N of the grid (x
  // fastest): a = 1, c = 0 forward; a = N - 1, c = N - 1 reverse; a random a
  // coprime to N and a random c for a random order. O(1) memory for any grid.
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  uint64_t a = 1, c = 0;
  if (tl_order.kind == OrderKind::kReverse) {
    a = nblocks - 1;
    c = nblocks - 1;
  } else if (tl_order.kind == OrderKind::kRandom && nblocks > 1) {
    c = tl_order.below(nblocks);
    do a = 1 + tl_order.below(nblocks - 1);
    while (std::gcd(a, nblocks) != 1);
  }
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t j = uint64_t((unsigned __int128)(a) * k % nblocks + c) % nblocks;
    b.idx = uint3{unsigned(j % grid.x), unsigned(j / grid.x % grid.y), unsigned(j / grid.x / grid.y)};
    run_block(b);
  }
  tl_block = nullptr;
  return cudaSuccess;
}

}  // namespace pyreg::emu
