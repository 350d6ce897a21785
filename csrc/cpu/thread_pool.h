// thread_pool.h: pyreg's own small thread pool for the CPU kernels.
//
// Why not OpenMP: torch already carries an OpenMP runtime (libgomp or Intel's);
// linking a second one beside it is a known source of oversubscription and
// crashes. The pool is sized per call from torch.get_num_threads(), which
// Python passes in.
#pragma once
#include <cstdint>
#include <functional>

namespace pyreg::cpu {

// Runs fn(i) for every i in [0, n_items), on up to `nthreads` threads (the
// calling thread included). Items are handed out dynamically, so any thread may
// run any item: callers must make results depend on the item, not the thread.
// Reentrant calls, or calls from a second thread while the pool is busy, run
// serially on the calling thread.
void parallel_for(int64_t n_items, int nthreads, const std::function<void(int64_t)>& fn);

}  // namespace pyreg::cpu
