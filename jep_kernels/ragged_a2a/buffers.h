// What both handlers (cpu.cc, cuda.cu) read off their XLA buffers, and how they refuse input.
#ifndef JEP_KERNELS_RAGGED_A2A_BUFFERS_H_
#define JEP_KERNELS_RAGGED_A2A_BUFFERS_H_

#include <cstdint>
#include <string>

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

inline ffi::Error Invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jep ffi transport: " + message);
}

}  // namespace jep

#endif  // JEP_KERNELS_RAGGED_A2A_BUFFERS_H_
