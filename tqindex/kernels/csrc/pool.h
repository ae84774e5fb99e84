// The kernels' threads: run(n, fn) calls fn(0..n-1) on up to n threads (the caller is one of
// them), tasks claimed in order, and returns when all are done; the first exception a task
// throws is rethrown to the caller once the others have finished.
//
// Where the build has OpenMP, the threads are an OpenMP team of the process's runtime: torch's
// libgomp, which the extension binds to (same soname, loaded before it). The team that ran
// torch's last product, spinning for more work, then runs the tasks at once, where a second
// pool's workers would share the cores with it (an IVF search at nprobe 1-8, 2 cores: 10-30%
// faster). The team is used only in the process the caller named (set_openmp_pid): GNU OpenMP
// hangs in a child forked after the parent used its threads (torch's products included, whether
// or not the parent ever searched), and only the Python side can know where the package was
// imported. Elsewhere, a small persistent pool of std::threads, created on first need and kept; a
// forked child starts a fresh one (the parent's workers do not exist there).
#pragma once

#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tq {

// the one process whose searches run on the OpenMP team (0: none, the default)
inline std::atomic<pid_t> openmp_pid{0};

inline void set_openmp_pid(pid_t pid) { openmp_pid.store(pid); }

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = nullptr;  // never destroyed: workers are detached and live until exit
    static std::mutex guard;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new Pool();  // a forked child's old pool is abandoned
    return *pool;
  }

  void run(int n, const std::function<void(int)>& fn) {
    std::exception_ptr error;
    std::mutex error_mutex;
    const std::function<void(int)> guarded = [&](int task) {
      try {
        fn(task);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    };
    dispatch(n, guarded);
    if (error) std::rethrow_exception(error);
  }

 private:
  Pool() : pid_(getpid()) {}

  void dispatch(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      if (n == 1) fn(0);
      return;
    }
#if defined(_OPENMP)
    if (pid_ == openmp_pid.load()) {
      // the team at torch's size at least (idle members find no task): a team of another size makes
      // libgomp end the threads beyond it, and torch's next product start them again
      std::atomic<int> next{0};
#pragma omp parallel num_threads(std::max(n, omp_get_max_threads()))
      for (int task = next.fetch_add(1); task < n; task = next.fetch_add(1)) fn(task);
      return;
    }
#endif
    std::lock_guard<std::mutex> one_job(run_mutex_);  // concurrent callers take turns
    grow(n - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      tasks_ = n;
      next_.store(0);
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return active_ == 0; });  // every task is claimed: wait for those still running
    job_ = nullptr;  // a worker that wakes late finds no job
  }

  void grow(int workers) {
    while (static_cast<int>(started_) < workers) {
      std::thread([this] { loop(); }).detach();
      ++started_;
    }
  }

  // Claim and run tasks of the current job until none are left.
  void work() {
    for (;;) {
      const int task = next_.fetch_add(1);
      if (task >= tasks_) return;
      (*job_)(task);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (job_ == nullptr) continue;
        ++active_;
      }
      work();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --active_;
      }
      done_.notify_all();
    }
  }

  pid_t pid_;
  unsigned started_ = 0;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int tasks_ = 0, active_ = 0;
  std::atomic<int> next_{0};
  uint64_t generation_ = 0;
};

}  // namespace tq
