// Who owns the low-latency calls' buffers (both handlers, host code).
//
// A low-latency call names its owner: the id of a `jep.low_latency.Buffer` the user holds. Each
// device keeps one buffer set per (owner, call kind, shape): made on the first run of a call of
// that shape, reused by every later call of it (another trace, another jit, another call site
// of the same program), freed when the owner is released. So the sets live are bounded by the
// shapes a program uses, not by how often it is traced. A released owner stays released: a
// call that still names it fails instead of allocating again.
//
// The CUDA handler's set is its device allocation and the peers' addresses; the CPU handler
// keeps no memory between calls (it reads its peers' operands during the host meeting) and
// records sets of zero bytes, so the ownership rules are the same, and tested, everywhere.
#ifndef JEP_KERNELS_RAGGED_A2A_BUFFER_SETS_H_
#define JEP_KERNELS_RAGGED_A2A_BUFFER_SETS_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "buffers.h"  // LowLatencyShape

namespace jep {

enum class LowLatencyKind : int32_t { kDispatch = 0, kCombine = 1 };

struct BufferSetKey {
  int64_t owner;
  LowLatencyKind kind;
  int64_t n, tokens, k, experts, row_bytes;
  int32_t device;

  auto Tie() const { return std::tie(owner, kind, n, tokens, k, experts, row_bytes, device); }
  bool operator<(const BufferSetKey& other) const { return Tie() < other.Tie(); }

  // The same on every device of the set's meeting: an op id for `Rendezvous` (kept apart from
  // the ids Python draws, which count up from 1, by its top bit).
  int64_t MeetingOp() const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields but the device
    for (int64_t field : {owner, static_cast<int64_t>(kind), n, tokens, k, experts, row_bytes}) {
      for (int byte = 0; byte < 8; ++byte) {
        h = (h ^ ((static_cast<uint64_t>(field) >> (8 * byte)) & 0xff)) * 1099511628211ull;
      }
    }
    return static_cast<int64_t>(h | (1ull << 63));
  }
};

inline BufferSetKey KeyOf(int64_t owner, LowLatencyKind kind, const LowLatencyShape& shape,
                          int32_t device) {
  return BufferSetKey{owner, kind, shape.n, shape.tokens, shape.k, shape.experts,
                      shape.row_bytes, device};
}

// The sets of one handler. `Set` has a field `int64_t bytes`.
template <typename Set>
class BufferSets {
 public:
  bool Released(int64_t owner) {
    std::lock_guard<std::mutex> lock(mutex_);
    return released_.count(owner) > 0;
  }

  std::optional<Set> Find(const BufferSetKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = sets_.find(key);
    if (found == sets_.end()) return std::nullopt;
    return found->second;
  }

  void Add(const BufferSetKey& key, Set set) {
    std::lock_guard<std::mutex> lock(mutex_);
    sets_[key] = std::move(set);
  }

  // Marks `owner` released and hands back its sets, for the caller to free.
  std::vector<std::pair<BufferSetKey, Set>> Release(int64_t owner) {
    std::lock_guard<std::mutex> lock(mutex_);
    released_.insert(owner);
    std::vector<std::pair<BufferSetKey, Set>> taken;
    for (auto it = sets_.begin(); it != sets_.end();) {
      if (it->first.owner == owner) {
        taken.emplace_back(it->first, std::move(it->second));
        it = sets_.erase(it);
      } else {
        ++it;
      }
    }
    return taken;
  }

  // The sets live on all devices, and their bytes, of `owner` (of every owner when < 0).
  void Count(int64_t owner, int64_t* sets, int64_t* bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    *sets = 0;
    *bytes = 0;
    for (const auto& [key, set] : sets_) {
      if (owner >= 0 && key.owner != owner) continue;
      *sets += 1;
      *bytes += set.bytes;
    }
  }

 private:
  std::mutex mutex_;
  std::map<BufferSetKey, Set> sets_;
  std::set<int64_t> released_;
};

}  // namespace jep

#endif  // JEP_KERNELS_RAGGED_A2A_BUFFER_SETS_H_
