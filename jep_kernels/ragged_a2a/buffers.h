// What both handlers (cpu.cc, cuda.cu) share: the operands and attributes of the two calls (as
// `jep_kernels.ragged_a2a` passes them), what they read off their buffers, how they refuse input.
#ifndef JEP_KERNELS_RAGGED_A2A_BUFFERS_H_
#define JEP_KERNELS_RAGGED_A2A_BUFFERS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jep {

namespace ffi = xla::ffi;

// Bytes of one row: a buffer is [rows, *row shape].
inline int64_t RowBytes(const ffi::AnyBuffer& buffer) {
  auto dims = buffer.dimensions();
  int64_t bytes = static_cast<int64_t>(ffi::ByteWidth(buffer.element_type()));
  for (size_t d = 1; d < dims.size(); ++d) bytes *= dims[d];
  return bytes;
}

inline int64_t NumRows(const ffi::AnyBuffer& buffer) {
  auto dims = buffer.dimensions();
  return dims.size() == 0 ? 1 : dims[0];
}

// The dtypes exchange_sum adds (in float32).
inline bool Summable(ffi::DataType dtype) {
  return dtype == ffi::DataType::F32 || dtype == ffi::DataType::F64 ||
         dtype == ffi::DataType::BF16 || dtype == ffi::DataType::F16;
}

// An exchange's expansion (has_expand): received row r goes to the rows dest[r * k + j] of
// `out` that lie in [0, out_rows), for j < k; rows of `out` from `filled` on are zero.
struct Expansion {
  const int32_t* dest;  // [received, k]
  int64_t received;
  int64_t k;
  const int32_t* filled;  // [1]
};

inline Expansion ExpansionOf(const ffi::Buffer<ffi::S32>& expand,
                             const ffi::Buffer<ffi::S32>& filled) {
  auto dims = expand.dimensions();
  return Expansion{expand.typed_data(), dims.size() > 0 ? dims[0] : 0,
                   dims.size() > 1 ? dims[1] : 1, filled.typed_data()};
}

inline ffi::Error Invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jep ffi transport: " + message);
}

// The rest of a binding that starts with a platform's own contexts: the run id, then
//   exchange:     rows, index, send_sizes, coords (group, rank, op), expand, filled -> out
//   exchange_sum: rows, send_sizes, slot_row, slot_mask, coords (group, rank, op) -> out
// with the attributes num_ranks, [has_index, has_expand,] timeout_ms, what. The op id, which
// calls of the same op on the devices of a group meet by, is an operand: one traced program
// (a cached `jax.jit`) can be called from several places, each passing its own.
template <typename Binding>
auto BindExchange(Binding binding) {
  return std::move(binding).template Ctx<ffi::RunId>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<int64_t>("num_ranks")
      .template Attr<bool>("has_index")
      .template Attr<bool>("has_expand")
      .template Attr<int64_t>("timeout_ms")
      .template Attr<std::string_view>("what");
}

template <typename Binding>
auto BindExchangeSum(Binding binding) {
  return std::move(binding).template Ctx<ffi::RunId>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::PRED>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<int64_t>("num_ranks")
      .template Attr<int64_t>("timeout_ms")
      .template Attr<std::string_view>("what");
}

// The low-latency calls (low_latency.h), after a platform's own contexts and the run id:
//   dispatch: x, send_index [n, T], pair_local [n, T, k], pair_index [n, T, k],
//             pair_weight f32[n, T, k], counts [n, E], rows_to [n], coords (group, rank)
//             -> recv_x [C, ...], group_sizes [E], pair_row [n * T, k], recv_weight f32[n * T, k],
//                recv_count [n], num_dropped [1]
//   combine:  y [C, ...], pair_row [n * T, k], recv_weight f32[n * T, k], recv_count [n],
//             home_slot [T, k], coords -> out [T, ...]
// with the attributes op, owner (the `jep.low_latency.Buffer` whose buffers the call uses,
// buffer_sets.h), num_ranks, [capacity,] timeout_ms, what, and the (group, rank) of each device
// ordinal of the process (the GPU handler must know them without reading `coords`).
template <typename Binding>
auto BindLowLatencyAttrs(Binding binding) {
  return std::move(binding).template Attr<int64_t>("op")
      .template Attr<int64_t>("owner")
      .template Attr<int64_t>("num_ranks")
      .template Attr<int64_t>("timeout_ms")
      .template Attr<std::string_view>("what")
      .template Attr<ffi::Span<const int64_t>>("device_groups")
      .template Attr<ffi::Span<const int64_t>>("device_ranks");
}

template <typename Binding>
auto BindLowLatencyDispatch(Binding binding) {
  return BindLowLatencyAttrs(std::move(binding).template Ctx<ffi::RunId>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Attr<int64_t>("capacity"));
}

template <typename Binding>
auto BindLowLatencyCombine(Binding binding) {
  return BindLowLatencyAttrs(std::move(binding).template Ctx<ffi::RunId>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>());
}

// The shapes of a low-latency call, read off its operands.
struct LowLatencyShape {
  int64_t n;          // ranks
  int64_t tokens;     // T, rows a rank sends one peer at most
  int64_t k;          // slots per row
  int64_t experts;    // E, local experts per rank (0 for combine)
  int64_t out_rows;   // C, rows of recv_x (dispatch) or of y (combine)
  int64_t row_bytes;
};

}  // namespace jep

#endif  // JEP_KERNELS_RAGGED_A2A_BUFFERS_H_
