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
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "buffers.h"
#include "rendezvous.h"
#include "routes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jep {
namespace {

Rendezvous<Peer>& Meetings() {
  static auto* meetings = new Rendezvous<Peer>();
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

// What a rank does with its peers once all have arrived: fill its `out`.
using Receive = std::function<ffi::Error(const std::vector<Peer>& peers, const Routes& routes)>;

// Publishes `self` and returns at once; when the last rank arrives, every rank's `receive` runs
// (on that thread), then every rank's future completes. XLA keeps a rank's buffers until then.
ffi::Future Meet(CallSite site, const Peer& self, Receive receive) {
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
  int me = site.rank;
  std::string what = site.what;
  auto result = std::make_shared<ffi::Error>(ffi::Error::Success());
  Rendezvous<Peer>::Joiner joiner;
  joiner.use = [receive = std::move(receive), result, me, what](const std::vector<Peer>& peers) {
    for (const Peer& peer : peers) {
      if (peer.row_bytes != peers[me].row_bytes) {
        *result = Invalid(what + ": ranks disagree on the row size: every rank must run the "
                                 "same program");
        return;
      }
    }
    Routes routes;
    ComputeRoutes(peers.data(), static_cast<int>(peers.size()), me, &routes);
    *result = receive(peers, routes);
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
    Meetings().Number(site);
    Meetings().Join(site, 0, self, std::move(joiner));
  }
  return future;
}

CallSite Site(int64_t run, const ffi::Buffer<ffi::S32>& coords, int64_t op, int64_t num_ranks,
              int64_t timeout_ms, std::string_view what) {
  const int32_t* c = coords.typed_data();
  return CallSite{run, op, c[0], c[1], static_cast<int32_t>(num_ranks), timeout_ms,
                  std::string(what)};
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
                     ffi::Result<ffi::AnyBuffer> out, int64_t op, int64_t num_ranks,
                     bool has_index, bool has_expand, int64_t timeout_ms, std::string_view what) {
  if (static_cast<int64_t>(send_sizes.element_count()) != num_ranks) {
    return Ready(Invalid("send_sizes must have one entry per rank"));
  }
  CallSite site = Site(run.run_id, coords, op, num_ranks, timeout_ms, what);
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
                        ffi::Buffer<ffi::S32> coords, ffi::Result<ffi::AnyBuffer> out, int64_t op,
                        int64_t num_ranks, int64_t timeout_ms, std::string_view what) {
  ffi::DataType dtype = rows.element_type();
  if (!Summable(dtype)) {
    return Ready(Invalid("exchange_sum adds f16, bf16, f32 or f64 rows only"));
  }
  if (static_cast<int64_t>(send_sizes.element_count()) != num_ranks) {
    return Ready(Invalid("send_sizes must have one entry per rank"));
  }
  CallSite site = Site(run.run_id, coords, op, num_ranks, timeout_ms, what);
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

}  // namespace
}  // namespace jep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JepRaggedExchange, jep::Exchange,
                              jep::BindExchange(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JepRaggedExchangeSum, jep::ExchangeSum,
                              jep::BindExchangeSum(ffi::Ffi::Bind()));
