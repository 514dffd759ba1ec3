// The ragged all-to-all on XLA:CPU: each device's call copies its received rows straight out of
// its peers' buffers (the simulated devices of one process share the host memory).
//
// The calls are asynchronous: each returns a future at once and the last rank to arrive does the
// copies of all, so no thread of XLA:CPU ever blocks waiting for another device (XLA:CPU may run
// independent calls of one program in different orders on different devices).
//
// Two handlers, both pulls (see routes.h):
//   JepRaggedExchange:    out[r] = received row r (peer p's rows[index[s]]), zeros past the last;
//                         with an expansion, received row r goes to out[dest[r, j]] instead,
//                         and the rows from `filled` on are zero (buffers.h).
//   JepRaggedExchangeSum: out[t] = sum over j with mask[t, j] of received row slot_row[t, j],
//                         added in float32 in slot order and rounded once to the rows' dtype.
// and the two low-latency calls (low_latency.h), pulls here too:
//   JepLowLatencyDispatch: the rows each peer sends this rank, laid out by local expert;
//   JepLowLatencyCombine:  each token's rows from the ranks it reached, weighted and added.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "buffer_sets.h"
#include "buffers.h"
#include "low_latency.h"
#include "rendezvous.h"
#include "routes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jep {
namespace {

// One meeting point per kind of value the ranks publish.
template <typename Value>
Rendezvous<Value>& Meetings() {
  static auto* meetings = new Rendezvous<Value>();
  return *meetings;
}

// bfloat16 <-> float32 as XLA converts them: widen exactly, narrow rounding to nearest even.
float Bf16ToF32(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

uint16_t F32ToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Reads element i of a row of `dtype` as float32; writes float32 as `dtype`.
float Load(ffi::DataType dtype, const char* row, int64_t i) {
  switch (dtype) {
    case ffi::DataType::F32: return reinterpret_cast<const float*>(row)[i];
    case ffi::DataType::F64: return static_cast<float>(reinterpret_cast<const double*>(row)[i]);
    case ffi::DataType::BF16: return Bf16ToF32(reinterpret_cast<const uint16_t*>(row)[i]);
    case ffi::DataType::F16: return static_cast<float>(reinterpret_cast<const _Float16*>(row)[i]);
    default: return 0.0f;
  }
}

void Store(ffi::DataType dtype, char* row, int64_t i, float value) {
  switch (dtype) {
    case ffi::DataType::F32: reinterpret_cast<float*>(row)[i] = value; break;
    case ffi::DataType::F64: reinterpret_cast<double*>(row)[i] = value; break;
    case ffi::DataType::BF16: reinterpret_cast<uint16_t*>(row)[i] = F32ToBf16(value); break;
    case ffi::DataType::F16: reinterpret_cast<_Float16*>(row)[i] = static_cast<_Float16>(value); break;
    default: break;
  }
}

ffi::Future Ready(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(std::move(error));
  }
  return future;
}

// Publishes `self` and returns at once; when the last rank arrives, every rank's `receive` runs
// (on that thread) with all ranks' values, then every rank's future completes. XLA keeps a
// rank's buffers until then.
template <typename Value>
ffi::Future MeetAll(CallSite site, const Value& self,
                    std::function<ffi::Error(const std::vector<Value>&)> receive) {
  if (site.num_ranks < 1 || site.num_ranks > kMaxPeers) {
    return Ready(Invalid("1 to " + std::to_string(kMaxPeers) + " ranks, got " +
                         std::to_string(site.num_ranks)));
  }
  if (site.rank < 0 || site.rank >= site.num_ranks) {
    return Ready(Invalid("rank " + std::to_string(site.rank) + " outside [0, " +
                         std::to_string(site.num_ranks) + ")"));
  }
  ffi::Promise promise;
  ffi::Future future(promise);
  auto result = std::make_shared<ffi::Error>(ffi::Error::Success());
  typename Rendezvous<Value>::Joiner joiner;
  joiner.use = [receive = std::move(receive), result](const std::vector<Value>& values) {
    *result = receive(values);
  };
  joiner.finish = [promise, result](const std::string* error) mutable {
    if (error != nullptr) {
      promise.SetError(ffi::Error(ffi::ErrorCode::kDeadlineExceeded, *error));
    } else if (result->failure()) {
      promise.SetError(*result);
    } else {
      promise.SetAvailable();
    }
  };
  joiner.own_thread = true;
  if (site.num_ranks == 1) {
    joiner.use({self});
    joiner.finish(nullptr);
  } else {
    Meetings<Value>().Number(site);
    Meetings<Value>().Join(site, 0, self, std::move(joiner));
  }
  return future;
}

// What a rank of an exchange does with its peers once all have arrived: fill its `out`.
using Receive = std::function<ffi::Error(const std::vector<Peer>& peers, const Routes& routes)>;

ffi::Future Meet(CallSite site, const Peer& self, Receive receive) {
  int me = site.rank;
  std::string what = site.what;
  return MeetAll<Peer>(site, self, [=](const std::vector<Peer>& peers) {
    for (const Peer& peer : peers) {
      if (peer.row_bytes != peers[me].row_bytes) {
        return Invalid(what + ": ranks disagree on the row size: every rank must run the "
                              "same program");
      }
    }
    Routes routes;
    ComputeRoutes(peers.data(), static_cast<int>(peers.size()), me, &routes);
    return receive(peers, routes);
  });
}

CallSite Site(int64_t run, const ffi::Buffer<ffi::S32>& coords, int64_t op, int64_t num_ranks,
              int64_t timeout_ms, std::string_view what) {
  const int32_t* c = coords.typed_data();
  return CallSite{run, op, c[0], c[1], static_cast<int32_t>(num_ranks), timeout_ms,
                  std::string(what)};
}

// The exchanges' coords are (group, rank, op).
ffi::Error CheckCoords(const ffi::Buffer<ffi::S32>& coords) {
  if (coords.element_count() != 3) return Invalid("coords must be (group, rank, op)");
  return ffi::Error::Success();
}

// A received row copied to `to`, or zeros where there is none (`src` null).
void CopyRow(const char* src, char* to, int64_t row_bytes) {
  if (src != nullptr) {
    std::memcpy(to, src, row_bytes);
  } else {
    std::memset(to, 0, row_bytes);
  }
}

ffi::Future Exchange(ffi::RunId run, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> index,
                     ffi::Buffer<ffi::S32> send_sizes, ffi::Buffer<ffi::S32> coords,
                     ffi::Buffer<ffi::S32> expand, ffi::Buffer<ffi::S32> filled,
                     ffi::Result<ffi::AnyBuffer> out, int64_t num_ranks, bool has_index,
                     bool has_expand, int64_t timeout_ms, std::string_view what) {
  if (static_cast<int64_t>(send_sizes.element_count()) != num_ranks) {
    return Ready(Invalid("send_sizes must have one entry per rank"));
  }
  if (ffi::Error error = CheckCoords(coords); error.failure()) return Ready(std::move(error));
  CallSite site = Site(run.run_id, coords, coords.typed_data()[2], num_ranks, timeout_ms, what);
  Peer self{static_cast<const char*>(rows.untyped_data()), NumRows(rows),
            has_index ? index.typed_data() : nullptr,
            static_cast<int64_t>(index.element_count()), send_sizes.typed_data(),
            RowBytes(rows), 0};
  char* dst = static_cast<char*>(out->untyped_data());
  int64_t out_rows = NumRows(*out), row_bytes = RowBytes(*out);
  if (has_expand) {
    Expansion expansion = ExpansionOf(expand, filled);
    return Meet(site, self, [=](const std::vector<Peer>& peers, const Routes& routes) {
      int64_t first = std::min<int64_t>(std::max<int64_t>(*expansion.filled, 0), out_rows);
      std::memset(dst + first * row_bytes, 0, (out_rows - first) * row_bytes);
      for (int64_t r = 0; r < expansion.received; ++r) {
        const char* src = SourceRow(peers.data(), routes, static_cast<int>(peers.size()), r,
                                    row_bytes);
        for (int64_t j = 0; j < expansion.k; ++j) {
          int64_t d = expansion.dest[r * expansion.k + j];
          if (d >= 0 && d < out_rows) CopyRow(src, dst + d * row_bytes, row_bytes);
        }
      }
      return ffi::Error::Success();
    });
  }
  return Meet(site, self, [=](const std::vector<Peer>& peers, const Routes& routes) {
    for (int64_t r = 0; r < out_rows; ++r) {
      CopyRow(SourceRow(peers.data(), routes, static_cast<int>(peers.size()), r, row_bytes),
              dst + r * row_bytes, row_bytes);
    }
    return ffi::Error::Success();
  });
}

ffi::Future ExchangeSum(ffi::RunId run, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> send_sizes,
                        ffi::Buffer<ffi::S32> slot_row, ffi::Buffer<ffi::PRED> slot_mask,
                        ffi::Buffer<ffi::S32> coords, ffi::Result<ffi::AnyBuffer> out,
                        int64_t num_ranks, int64_t timeout_ms, std::string_view what) {
  ffi::DataType dtype = rows.element_type();
  if (!Summable(dtype)) {
    return Ready(Invalid("exchange_sum adds f16, bf16, f32 or f64 rows only"));
  }
  if (static_cast<int64_t>(send_sizes.element_count()) != num_ranks) {
    return Ready(Invalid("send_sizes must have one entry per rank"));
  }
  if (ffi::Error error = CheckCoords(coords); error.failure()) return Ready(std::move(error));
  CallSite site = Site(run.run_id, coords, coords.typed_data()[2], num_ranks, timeout_ms, what);
  Peer self{static_cast<const char*>(rows.untyped_data()), NumRows(rows), nullptr, 0,
            send_sizes.typed_data(), RowBytes(rows), 0};
  auto slots = slot_row.dimensions();
  int64_t num_tokens = slots[0], top_k = slots.size() > 1 ? slots[1] : 1;
  int64_t row_bytes = RowBytes(*out);
  int64_t width = row_bytes / static_cast<int64_t>(ffi::ByteWidth(dtype));
  const int32_t* slot = slot_row.typed_data();
  const bool* mask = slot_mask.typed_data();
  char* dst = static_cast<char*>(out->untyped_data());
  return Meet(site, self, [=](const std::vector<Peer>& peers, const Routes& routes) {
    std::vector<float> total(width);
    for (int64_t t = 0; t < num_tokens; ++t) {
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t j = 0; j < top_k; ++j) {
        if (!mask[t * top_k + j]) continue;
        const char* src = SourceRow(peers.data(), routes, static_cast<int>(peers.size()),
                                    slot[t * top_k + j], row_bytes);
        if (src == nullptr) continue;
        for (int64_t i = 0; i < width; ++i) total[i] += Load(dtype, src, i);
      }
      for (int64_t i = 0; i < width; ++i) Store(dtype, dst + t * row_bytes, i, total[i]);
    }
    return ffi::Error::Success();
  });
}

// --- the low-latency calls (low_latency.h): dispatch to expert rows, combine with weights -----
//
// On the CPU they pull, like the exchange: each rank reads what its peers send it out of their
// operands once all have arrived. (The CUDA handler pushes into buffers kept between calls.)

// What a rank publishes to the ranks of a low-latency call: its operands.
struct LowLatencyPeer {
  const char* rows;           // dispatch: x [rows, row_bytes]; combine: y
  int64_t num_rows;
  int64_t row_bytes;
  const int32_t* send_index;  // dispatch: [n, T]
  const int32_t* pair_local;  // dispatch: [n, T, k]
  const int32_t* pair_index;  // dispatch: [n, T, k]
  const float* pair_weight;   // dispatch: [n, T, k]; combine: recv_weight [n * T, k]
  const int32_t* counts;      // dispatch: [n, E]
  const int32_t* rows_to;     // dispatch: [n]
  const int32_t* pair_row;    // combine: [n * T, k]
};

ffi::Error CheckRowBytes(const std::vector<LowLatencyPeer>& peers, int me, const std::string& what) {
  for (const LowLatencyPeer& peer : peers) {
    if (peer.row_bytes != peers[me].row_bytes) {
      return Invalid(what + ": ranks disagree on the row size: every rank must run the same "
                            "program");
    }
  }
  return ffi::Error::Success();
}

// The CPU keeps no memory between calls: its sets (buffer_sets.h) hold zero bytes.
struct LowLatencySet {
  int64_t bytes = 0;
};

BufferSets<LowLatencySet>& LowLatencySets() {
  static auto* sets = new BufferSets<LowLatencySet>();
  return *sets;
}

// Records the call's set under its owner, or refuses the call of a released owner.
ffi::Error UseSet(int64_t owner, LowLatencyKind kind, const LowLatencyShape& shape,
                  const CallSite& site) {
  std::string_view what = site.what;
  if (LowLatencySets().Released(owner)) {
    return Invalid(std::string(what) + ": its jep.low_latency.Buffer was released");
  }
  // A CPU device is its (group, rank).
  auto device = static_cast<int32_t>(site.group * site.num_ranks + site.rank);
  BufferSetKey key = KeyOf(owner, kind, shape, device);
  if (!LowLatencySets().Find(key)) LowLatencySets().Add(key, LowLatencySet{});
  return ffi::Error::Success();
}

ffi::Future LowLatencyDispatch(
    ffi::RunId run, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> send_index,
    ffi::Buffer<ffi::S32> pair_local, ffi::Buffer<ffi::S32> pair_index,
    ffi::Buffer<ffi::F32> pair_weight, ffi::Buffer<ffi::S32> counts,
    ffi::Buffer<ffi::S32> rows_to, ffi::Buffer<ffi::S32> coords,
    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
    ffi::Result<ffi::Buffer<ffi::S32>> pair_row, ffi::Result<ffi::Buffer<ffi::F32>> recv_weight,
    ffi::Result<ffi::Buffer<ffi::S32>> recv_count, ffi::Result<ffi::Buffer<ffi::S32>> num_dropped,
    int64_t capacity, int64_t op, int64_t owner, int64_t num_ranks, int64_t timeout_ms,
    std::string_view what, ffi::Span<const int64_t>, ffi::Span<const int64_t>) {
  auto dims = pair_local.dimensions();
  if (dims.size() != 3 || dims[0] != num_ranks) return Ready(Invalid("pair_local must be [n, T, k]"));
  LowLatencyShape shape{num_ranks, dims[1], dims[2], counts.dimensions()[1], NumRows(*recv_x),
                        RowBytes(*recv_x)};
  CallSite site = Site(run.run_id, coords, op, num_ranks, timeout_ms, what);
  if (ffi::Error error = UseSet(owner, LowLatencyKind::kDispatch, shape, site);
      error.failure()) {
    return Ready(error);
  }
  LowLatencyPeer self{static_cast<const char*>(x.untyped_data()), NumRows(x), RowBytes(x),
                      send_index.typed_data(), pair_local.typed_data(), pair_index.typed_data(),
                      pair_weight.typed_data(), counts.typed_data(), rows_to.typed_data(), nullptr};
  char* dst = static_cast<char*>(recv_x->untyped_data());
  int32_t* sizes = group_sizes->typed_data();
  int32_t* rows_of_pairs = pair_row->typed_data();
  float* weights = recv_weight->typed_data();
  int32_t* received = recv_count->typed_data();
  int32_t* dropped = num_dropped->typed_data();
  int me = site.rank;
  std::string name = site.what;
  return MeetAll<LowLatencyPeer>(site, self, [=](const std::vector<LowLatencyPeer>& peers) {
    if (ffi::Error error = CheckRowBytes(peers, me, name); error.failure()) return error;
    const int n = static_cast<int>(shape.n), experts = static_cast<int>(shape.experts);
    const int64_t T = shape.tokens, k = shape.k, C = shape.out_rows, row_bytes = shape.row_bytes;
    std::vector<int32_t> counts_from(n * experts), within(experts * n), start(experts);
    for (int src = 0; src < n; ++src) {
      for (int e = 0; e < experts; ++e) {
        counts_from[src * experts + e] = peers[src].counts[me * experts + e];
      }
    }
    int32_t kept;
    PlanGroups(counts_from.data(), n, experts, capacity, within.data(), start.data(), sizes, &kept,
               dropped);
    std::memset(dst, 0, C * row_bytes);
    for (int src = 0; src < n; ++src) {
      const LowLatencyPeer& from = peers[src];
      received[src] = from.rows_to[me];
      for (int64_t j = 0; j < T; ++j) {
        int64_t r = src * T + j, sent = (me * T + j) * k;
        int64_t token = j < received[src] ? from.send_index[me * T + j] : -1;
        const char* row = token >= 0 && token < from.num_rows ? from.rows + token * row_bytes : nullptr;
        for (int64_t s = 0; s < k; ++s) {
          int32_t q = static_cast<int32_t>(C);
          float weight = 0.0f;
          if (row != nullptr) {
            q = PairRow(within.data(), start.data(), sizes, n, experts, src,
                        from.pair_local[sent + s], from.pair_index[sent + s],
                        static_cast<int32_t>(C));
            weight = from.pair_weight[sent + s];
          }
          rows_of_pairs[r * k + s] = q;
          weights[r * k + s] = weight;
          if (q < C) std::memcpy(dst + q * row_bytes, row, row_bytes);
        }
      }
    }
    return ffi::Error::Success();
  });
}

ffi::Future LowLatencyCombine(
    ffi::RunId run, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> pair_row,
    ffi::Buffer<ffi::F32> recv_weight, ffi::Buffer<ffi::S32> recv_count,
    ffi::Buffer<ffi::S32> home_slot, ffi::Buffer<ffi::S32> coords, ffi::Result<ffi::AnyBuffer> out,
    int64_t op, int64_t owner, int64_t num_ranks, int64_t timeout_ms, std::string_view what,
    ffi::Span<const int64_t>, ffi::Span<const int64_t>) {
  ffi::DataType dtype = y.element_type();
  if (!Summable(dtype)) return Ready(Invalid("combine adds f16, bf16, f32 or f64 rows only"));
  auto slots = home_slot.dimensions();
  LowLatencyShape shape{num_ranks, slots[0], slots[1], 0, NumRows(y), RowBytes(y)};
  CallSite site = Site(run.run_id, coords, op, num_ranks, timeout_ms, what);
  if (ffi::Error error = UseSet(owner, LowLatencyKind::kCombine, shape, site);
      error.failure()) {
    return Ready(error);
  }
  LowLatencyPeer self{static_cast<const char*>(y.untyped_data()), NumRows(y), RowBytes(y),
                      nullptr, nullptr, nullptr, recv_weight.typed_data(), nullptr,
                      recv_count.typed_data(), pair_row.typed_data()};
  const int32_t* home = home_slot.typed_data();
  char* dst = static_cast<char*>(out->untyped_data());
  int me = site.rank;
  std::string name = site.what;
  return MeetAll<LowLatencyPeer>(site, self, [=](const std::vector<LowLatencyPeer>& peers) {
    if (ffi::Error error = CheckRowBytes(peers, me, name); error.failure()) return error;
    const int64_t T = shape.tokens, k = shape.k, row_bytes = shape.row_bytes;
    const int64_t width = row_bytes / static_cast<int64_t>(ffi::ByteWidth(dtype));
    std::vector<float> total(width), partial(width);
    std::vector<char> rounded(row_bytes);
    for (int64_t t = 0; t < T; ++t) {
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t s = 0; s < k; ++s) {
        int32_t slot = home[t * k + s];
        if (slot < 0 || slot >= shape.n * T) continue;
        // The partial sum expert rank p made of this token's row: its pairs, weighted, in
        // float32 in slot order, rounded to the rows' dtype before it travels.
        const LowLatencyPeer& expert = peers[slot / T];
        int64_t r = me * T + slot % T;
        std::fill(partial.begin(), partial.end(), 0.0f);
        for (int64_t s2 = 0; s2 < k; ++s2) {
          int32_t q = expert.pair_row[r * k + s2];
          if (q < 0 || q >= expert.num_rows) continue;
          float weight = expert.pair_weight[r * k + s2];
          const char* src = expert.rows + q * row_bytes;
          for (int64_t i = 0; i < width; ++i) partial[i] = std::fma(Load(dtype, src, i), weight, partial[i]);
        }
        for (int64_t i = 0; i < width; ++i) {
          Store(dtype, rounded.data(), i, partial[i]);
          total[i] += Load(dtype, rounded.data(), i);
        }
      }
      for (int64_t i = 0; i < width; ++i) Store(dtype, dst + t * row_bytes, i, total[i]);
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jep

// What the CUDA handler's symbols of the same names do; here there is nothing to free.
extern "C" int64_t JepLowLatencyRelease(int64_t owner) {
  return static_cast<int64_t>(jep::LowLatencySets().Release(owner).size());
}

extern "C" void JepLowLatencyLive(int64_t owner, int64_t* sets, int64_t* bytes) {
  jep::LowLatencySets().Count(owner, sets, bytes);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JepRaggedExchange, jep::Exchange,
                              jep::BindExchange(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JepRaggedExchangeSum, jep::ExchangeSum,
                              jep::BindExchangeSum(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JepLowLatencyDispatch, jep::LowLatencyDispatch,
                              jep::BindLowLatencyDispatch(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JepLowLatencyCombine, jep::LowLatencyCombine,
                              jep::BindLowLatencyCombine(ffi::Ffi::Bind()));
