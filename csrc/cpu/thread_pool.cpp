#include "thread_pool.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pyreg::cpu {
namespace {

// Workers join a job only while it is open. The caller drains items itself,
// then closes the job and waits only for workers that joined it: a worker that
// has not been scheduled yet (its core busy, e.g. with torch's OpenMP threads
// still spinning after a torch op) never delays the caller; it finds the job
// closed when it wakes and goes back to sleep.
class Pool {
 public:
  Pool() : pid_(getpid()) {}

  // Returns false (and does nothing) when another job holds the pool.
  bool try_run(int64_t n_items, int nthreads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(nthreads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_items_ = n_items;
      n_workers_ = nthreads - 1;
      open_ = true;
      next_.store(0, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
    drain(fn, n_items);
    {
      std::lock_guard<std::mutex> lk(mu_);
      open_ = false;  // from now on no worker joins
    }
    // Wait for the workers that joined: they are running and finish their
    // last item; a short spin then yield is enough.
    for (int spins = 0; active_.load(std::memory_order_acquire) != 0; ++spins)
      if (spins > 2000) std::this_thread::yield();
    fn_ = nullptr;
    return true;
  }

  pid_t pid() const { return pid_; }

 private:
  void drain(const std::function<void(int64_t)>& fn, int64_t n) {
    for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next_.fetch_add(1, std::memory_order_relaxed))
      fn(i);
  }

  void grow(int n) {
    while (int(threads_.size()) < n) {
      const int id = int(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();  // the pool lives for the whole process
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* fn;
      int64_t n;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (!open_ || id >= n_workers_) continue;  // too late, or not needed
        active_.fetch_add(1, std::memory_order_relaxed);  // under mu_: before the close
        fn = fn_;
        n = n_items_;
      }
      drain(*fn, n);
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  const pid_t pid_;
  std::vector<std::thread> threads_;
  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;      // guards the job description and open_
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  bool open_ = false;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  int n_workers_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};  // workers inside the current job
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // leaked on purpose: detached workers outlive main()

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  // After fork() the child has the pool object but none of its threads.
  if (g_pool == nullptr || g_pool->pid() != getpid()) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n_items, int nthreads, const std::function<void(int64_t)>& fn) {
  if (n_items <= 0) return;
  if (int64_t(nthreads) > n_items) nthreads = int(n_items);
  if (nthreads > 1 && pool().try_run(n_items, nthreads, fn)) return;
  for (int64_t i = 0; i < n_items; ++i) fn(i);
}

}  // namespace pyreg::cpu
