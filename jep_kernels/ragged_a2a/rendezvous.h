// The meeting point of one exchange's n calls, one per device of the process (host code).
//
// Each device's call joins a meeting with a value (its `Peer`) and two callbacks. When the last of
// the n joins, on its thread, every joiner's `use` runs with all n values, and only then every
// joiner's `finish`: a device may reuse its buffers once it is finished, and by then no peer
// reads them any more. A meeting that is not complete `timeout_ms` after its first join fails: a
// watchdog thread runs the joiners' `finish` with an error naming the ranks that never came. So a caller can wait for its
// callback (the GPU handler, whose thunks XLA runs in one fixed order on every device) or return
// at once and finish in the callback (the CPU handler, an asynchronous FFI call: XLA:CPU may run
// independent calls in different orders on different devices, so none of them may block).
//
// Calls meet by key: the XLA run, the op (an id each call site draws when it is traced: an operand
// of the exchanges, an attribute of the low-latency calls), the group (the devices that
// exchange together: one EP group of the mesh), the op's call count within the run on this rank
// (an op inside a loop runs many times per run, in the same order on every device), and a phase
// (one call may meet its peers more than once).
#ifndef JEP_KERNELS_RAGGED_A2A_RENDEZVOUS_H_
#define JEP_KERNELS_RAGGED_A2A_RENDEZVOUS_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace jep {

struct CallSite {
  int64_t run;
  int64_t op;
  int64_t group;
  int32_t rank;
  int32_t num_ranks;
  int64_t timeout_ms;
  std::string what;  // for messages: the op and the mesh axis
  int64_t call = 0;  // set by Rendezvous::Number
};

template <typename Value>
class Rendezvous {
 public:
  struct Joiner {
    std::function<void(const std::vector<Value>& values)> use;  // all n values, by rank
    std::function<void(const std::string* error)> finish;       // error: null on success
    // Run `finish` on a thread of its own: completing an XLA:CPU future runs the device's next
    // thunks on the completing thread, and one of them may block in an XLA collective.
    bool own_thread = false;
  };

  // Numbers this call of its op on its rank within the run (restarting with each run).
  void Number(CallSite& site) {
    std::lock_guard<std::mutex> lock(mutex_);
    Count& count = counts_[{site.op, site.group, site.rank}];
    if (count.run != site.run) count = {site.run, 0};
    site.call = count.calls++;
  }

  // Joins the meeting of (site, phase): `use` then `finish` run once it completes, or `finish`
  // alone when it fails.
  void Join(const CallSite& site, int phase, const Value& value, Joiner joiner) {
    std::vector<Joiner> joiners;
    std::vector<Value> values;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      StartWatchdog();
      Key key = {site.run, site.op, site.group, site.call, phase};
      auto found = meetings_.find(key);
      if (found == meetings_.end()) {
        Meeting meeting(site);
        found = meetings_.emplace(key, std::move(meeting)).first;
      }
      Meeting& meeting = found->second;
      meeting.values[site.rank] = value;
      meeting.joiners[site.rank] = std::move(joiner);
      meeting.joined[site.rank] = true;
      if (++meeting.num_joined < site.num_ranks) return;
      joiners = std::move(meeting.joiners);
      values = std::move(meeting.values);
      meetings_.erase(found);
    }
    for (Joiner& j : joiners) j.use(values);
    for (Joiner& j : joiners) Finish(j, nullptr);
  }

  // Joins and waits for the meeting: nullopt with `values` filled, or the error. `with_all`, if
  // given, runs with all values before any joiner of the meeting returns.
  std::optional<std::string> JoinAndWait(
      const CallSite& site, int phase, const Value& value, std::vector<Value>* values,
      const std::function<void(const std::vector<Value>&)>& with_all = nullptr) {
    std::mutex mutex;
    std::condition_variable finished;
    bool ready = false;
    std::optional<std::string> failure;
    Joiner joiner;
    joiner.use = [&](const std::vector<Value>& all) {
      if (values != nullptr) *values = all;
      if (with_all) with_all(all);
    };
    joiner.finish = [&](const std::string* error) {
      std::lock_guard<std::mutex> lock(mutex);
      if (error != nullptr) failure = *error;
      ready = true;
      finished.notify_all();
    };
    Join(site, phase, value, std::move(joiner));
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [&] { return ready; });
    return failure;
  }

 private:
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int>;  // run, op, group, call, phase

  struct Meeting {
    explicit Meeting(const CallSite& site)
        : site(site), values(site.num_ranks), joiners(site.num_ranks), joined(site.num_ranks),
          deadline(std::chrono::steady_clock::now() + std::chrono::milliseconds(site.timeout_ms)) {}
    CallSite site;
    std::vector<Value> values;
    std::vector<Joiner> joiners;
    std::vector<bool> joined;
    int num_joined = 0;
    std::chrono::steady_clock::time_point deadline;
  };

  struct Count {
    int64_t run = -1;
    int64_t calls = 0;
  };

  static void Finish(Joiner& joiner, const std::string* error) {
    if (!joiner.own_thread) {
      joiner.finish(error);
      return;
    }
    std::optional<std::string> message;
    if (error != nullptr) message = *error;
    std::thread([finish = std::move(joiner.finish), message] {
      finish(message ? &*message : nullptr);
    }).detach();
  }

  static std::string Failure(const Meeting& meeting) {
    const CallSite& site = meeting.site;
    std::ostringstream missing, message;
    const char* sep = "";
    for (int r = 0; r < site.num_ranks; ++r) {
      if (!meeting.joined[r]) {
        missing << sep << r;
        sep = ", ";
      }
    }
    message << "jep ffi transport: " << site.what << ", EP group " << site.group
            << ": the ranks that never arrived within " << site.timeout_ms / 1000.0 << " s: ["
            << missing.str() << "] of " << site.num_ranks
            << ". Every device of the EP axis must run the same program; a device that failed "
               "or stalled keeps the others waiting. The timeout is "
               "DispatchConfig(timeout_s=...) or the calls' timeout_s (default "
               "JEP_FFI_TIMEOUT_S, read at trace time); backend='reference' avoids this "
               "transport.";
    return message.str();
  }

  // A thread that fails the meetings past their deadline (started on first use, never joined).
  void StartWatchdog() {
    if (watchdog_started_) return;
    watchdog_started_ = true;
    std::thread([this] {
      while (true) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        std::vector<std::pair<std::vector<Joiner>, std::string>> expired;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          auto now = std::chrono::steady_clock::now();
          for (auto it = meetings_.begin(); it != meetings_.end();) {
            if (it->second.deadline > now) {
              ++it;
              continue;
            }
            expired.emplace_back(std::move(it->second.joiners), Failure(it->second));
            it = meetings_.erase(it);
          }
        }
        for (auto& [joiners, error] : expired) {
          for (Joiner& j : joiners) {
            if (j.finish) Finish(j, &error);
          }
        }
      }
    }).detach();
  }

  std::mutex mutex_;
  std::map<Key, Meeting> meetings_;
  std::map<std::tuple<int64_t, int64_t, int32_t>, Count> counts_;  // op, group, rank
  bool watchdog_started_ = false;
};

}  // namespace jep

#endif  // JEP_KERNELS_RAGGED_A2A_RENDEZVOUS_H_
