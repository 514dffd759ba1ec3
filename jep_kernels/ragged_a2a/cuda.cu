// The ragged all-to-all on NVIDIA GPUs: each device's kernel reads its received rows straight out
// of its peers' memory over NVLink (peer access between the GPUs of this process).
//
// The same two handlers as cpu.cc, with the same routes (routes.h) and rendezvous (rendezvous.h):
//   JepRaggedExchange:    out[r] = received row r, zeros past the last.
//   JepRaggedExchangeSum: out[t] = sum over j with mask[t, j] of received row slot_row[t, j],
//                         added in float32 in slot order, rounded once (to nearest even).
//
// One call: copy this rank's send sizes and coordinates to the host and wait for the stream (so
// this rank's inputs are complete), meet the peers (exchanging pointers and sizes), launch the
// pull kernel, wait for it, and leave once every peer is done reading this rank's buffers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "buffers.h"
#include "rendezvous.h"
#include "routes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jep {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSlots = 64;  // slots per token in exchange_sum (one shared-memory pointer each)

struct PeerTable {
  Peer peers[kMaxPeers];
  Routes routes;
  int n;
};

Rendezvous<Peer>& Meetings() {
  static auto* meetings = new Rendezvous<Peer>();
  return *meetings;
}

ffi::Error CudaError(cudaError_t status, const char* what) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jep ffi transport: ") + what + ": " + cudaGetErrorString(status));
}

#define JEP_CUDA(call, what)                                   \
  do {                                                         \
    cudaError_t status_ = (call);                              \
    if (status_ != cudaSuccess) return CudaError(status_, what); \
  } while (0)

// Peer access from `device` to each peer's GPU, enabled once per pair for the process.
ffi::Error EnablePeerAccess(int device, const std::vector<Peer>& peers) {
  static std::mutex mutex;
  static std::set<std::pair<int, int>> enabled;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Peer& peer : peers) {
    if (peer.device == device || enabled.count({device, peer.device})) continue;
    int can = 0;
    JEP_CUDA(cudaDeviceCanAccessPeer(&can, device, peer.device), "cudaDeviceCanAccessPeer");
    if (!can) {
      return Invalid("GPU " + std::to_string(device) + " cannot access GPU " +
                     std::to_string(peer.device) + " directly (no peer access); use "
                     "backend='xla' there");
    }
    cudaError_t status = cudaDeviceEnablePeerAccess(peer.device, 0);
    if (status == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();  // clear it
    } else if (status != cudaSuccess) {
      return CudaError(status, "cudaDeviceEnablePeerAccess");
    }
    enabled.insert({device, peer.device});
  }
  return ffi::Error::Success();
}

// One exchange's host side: the copied sizes, the meeting, the routes.
struct Call {
  CallSite site;
  std::vector<int32_t> host;  // coords (group, rank), then this rank's send sizes
  std::vector<Peer> peers;
  PeerTable table;
  bool met = false;  // joined the peers: must wait for them before returning
};

// Copies coords and sizes to the host, meets the peers and computes this rank's routes.
ffi::Error Begin(cudaStream_t stream, int32_t device, int64_t run, const ffi::AnyBuffer& rows,
                 const int32_t* index, int64_t index_len, const ffi::Buffer<ffi::S32>& send_sizes,
                 const ffi::Buffer<ffi::S32>& coords, int64_t num_ranks, int64_t op,
                 int64_t timeout_ms, std::string_view what, Call* call) {
  if (num_ranks < 1 || num_ranks > kMaxPeers) {
    return Invalid("1 to " + std::to_string(kMaxPeers) + " ranks, got " + std::to_string(num_ranks));
  }
  if (static_cast<int64_t>(send_sizes.element_count()) != num_ranks) {
    return Invalid("send_sizes must have one entry per rank");
  }
  JEP_CUDA(cudaSetDevice(device), "cudaSetDevice");
  call->host.resize(2 + num_ranks);
  JEP_CUDA(cudaMemcpyAsync(call->host.data(), coords.typed_data(), 2 * sizeof(int32_t),
                           cudaMemcpyDeviceToHost, stream), "copying coords");
  JEP_CUDA(cudaMemcpyAsync(call->host.data() + 2, send_sizes.typed_data(),
                           num_ranks * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
           "copying send sizes");
  JEP_CUDA(cudaStreamSynchronize(stream), "waiting for the inputs");
  call->site = CallSite{run, op, call->host[0], call->host[1], static_cast<int32_t>(num_ranks),
                        timeout_ms, std::string(what)};
  if (call->site.rank < 0 || call->site.rank >= num_ranks) return Invalid("rank out of range");
  Peer self{static_cast<const char*>(rows.untyped_data()), NumRows(rows), index, index_len,
            call->host.data() + 2, RowBytes(rows), device};
  if (num_ranks == 1) {
    call->peers = {self};
  } else {
    Meetings().Number(call->site);
    if (auto failure = Meetings().JoinAndWait(call->site, 0, self, &call->peers)) {
      return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, *failure);
    }
    call->met = true;
    for (const Peer& peer : call->peers) {
      if (peer.row_bytes != self.row_bytes) {
        return Invalid(call->site.what + ": ranks disagree on the row size");
      }
    }
    if (ffi::Error error = EnablePeerAccess(device, call->peers); error.failure()) return error;
  }
  for (int p = 0; p < num_ranks; ++p) call->table.peers[p] = call->peers[p];
  call->table.n = static_cast<int>(num_ranks);
  ComputeRoutes(call->peers.data(), call->table.n, call->site.rank, &call->table.routes);
  return ffi::Error::Success();
}

// Waits for this rank's kernel, then for every peer's, before XLA may reuse the buffers. Runs
// also when the call failed after meeting its peers: they may be reading this rank's buffers.
ffi::Error End(cudaStream_t stream, Call* call, ffi::Error result) {
  if (result.success()) {
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) status = cudaStreamSynchronize(stream);
    if (status != cudaSuccess) result = CudaError(status, "running the kernel");
  }
  if (call->met) {
    if (auto failure = Meetings().JoinAndWait(call->site, 1, Peer{}, nullptr)) {
      return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, *failure);
    }
  }
  return result;
}

int Blocks(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks));
}

// --- exchange: one warp per received row, 16-byte words where the rows allow ---------------

template <typename Word>
__device__ void CopyRow(char* dst, const char* src, int64_t row_bytes, int lane) {
  Word* d = reinterpret_cast<Word*>(dst);
  const Word* s = reinterpret_cast<const Word*>(src);
  for (int64_t i = lane; i < row_bytes / static_cast<int64_t>(sizeof(Word)); i += 32) {
    d[i] = src == nullptr ? Word{} : s[i];
  }
}

template <typename Word>
__global__ void ExchangeKernel(PeerTable table, char* out, int64_t out_rows, int64_t row_bytes) {
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + warp; r < out_rows; r += warps) {
    int p;
    int64_t s;
    const char* src = nullptr;
    if (Locate(table.peers, table.routes, table.n, r, &p, &s)) {
      src = table.peers[p].rows + s * row_bytes;
    }
    CopyRow<Word>(out + r * row_bytes, src, row_bytes, lane);
  }
}

ffi::Error Exchange(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer rows,
                    ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::S32> send_sizes,
                    ffi::Buffer<ffi::S32> coords, ffi::Result<ffi::AnyBuffer> out, int64_t op,
                    int64_t num_ranks, bool has_index, int64_t timeout_ms, std::string_view what) {
  Call call;
  ffi::Error begun = Begin(stream, device, run.run_id, rows,
                           has_index ? index.typed_data() : nullptr,
                           static_cast<int64_t>(index.element_count()), send_sizes, coords,
                           num_ranks, op, timeout_ms, what, &call);
  if (begun.failure()) return End(stream, &call, std::move(begun));
  int64_t out_rows = NumRows(*out), row_bytes = RowBytes(*out);
  char* dst = static_cast<char*>(out->untyped_data());
  int blocks = Blocks(out_rows, kThreads / 32);
  if (row_bytes % 16 == 0) {
    ExchangeKernel<int4><<<blocks, kThreads, 0, stream>>>(call.table, dst, out_rows, row_bytes);
  } else if (row_bytes % 4 == 0) {
    ExchangeKernel<int32_t><<<blocks, kThreads, 0, stream>>>(call.table, dst, out_rows, row_bytes);
  } else {
    ExchangeKernel<char><<<blocks, kThreads, 0, stream>>>(call.table, dst, out_rows, row_bytes);
  }
  return End(stream, &call, ffi::Error::Success());
}

// --- exchange_sum: one block per token, float32 sums over its slots -------------------------

__device__ float ToF32(float v) { return v; }
__device__ float ToF32(double v) { return static_cast<float>(v); }
__device__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ float ToF32(__half v) { return __half2float(v); }

template <typename T> __device__ T FromF32(float v);
template <> __device__ float FromF32<float>(float v) { return v; }
template <> __device__ double FromF32<double>(float v) { return v; }
template <> __device__ __nv_bfloat16 FromF32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __half FromF32<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void ExchangeSumKernel(PeerTable table, const int32_t* slot_row, const bool* slot_mask,
                                  int64_t num_tokens, int top_k, T* out, int64_t width) {
  __shared__ const T* sources[kMaxSlots];
  constexpr int kVector = sizeof(T) < 16 ? 16 / sizeof(T) : 1;  // elements per 16-byte load
  bool vectors = width % kVector == 0;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    __syncthreads();  // the previous token's sources are no longer read
    if (threadIdx.x < top_k) {
      int j = threadIdx.x, p;
      int64_t s;
      const T* src = nullptr;
      if (slot_mask[t * top_k + j] &&
          Locate(table.peers, table.routes, table.n, slot_row[t * top_k + j], &p, &s)) {
        src = reinterpret_cast<const T*>(table.peers[p].rows) + s * width;
      }
      sources[j] = src;
    }
    __syncthreads();
    T* dst = out + t * width;
    if (vectors) {
      for (int64_t c = threadIdx.x; c < width / kVector; c += blockDim.x) {
        float total[kVector];
        for (int i = 0; i < kVector; ++i) total[i] = 0.0f;
        for (int j = 0; j < top_k; ++j) {
          if (sources[j] == nullptr) continue;
          int4 word = reinterpret_cast<const int4*>(sources[j])[c];
          const T* value = reinterpret_cast<const T*>(&word);
          for (int i = 0; i < kVector; ++i) total[i] += ToF32(value[i]);
        }
        int4 word;
        T* value = reinterpret_cast<T*>(&word);
        for (int i = 0; i < kVector; ++i) value[i] = FromF32<T>(total[i]);
        reinterpret_cast<int4*>(dst)[c] = word;
      }
    } else {
      for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
        float total = 0.0f;
        for (int j = 0; j < top_k; ++j) {
          if (sources[j] != nullptr) total += ToF32(sources[j][i]);
        }
        dst[i] = FromF32<T>(total);
      }
    }
  }
}

template <typename T>
void LaunchSum(cudaStream_t stream, const PeerTable& table, const int32_t* slot_row,
               const bool* slot_mask, int64_t num_tokens, int top_k, void* out, int64_t width) {
  ExchangeSumKernel<T><<<Blocks(num_tokens, 1), kThreads, 0, stream>>>(
      table, slot_row, slot_mask, num_tokens, top_k, static_cast<T*>(out), width);
}

ffi::Error ExchangeSum(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer rows,
                       ffi::Buffer<ffi::S32> send_sizes, ffi::Buffer<ffi::S32> slot_row,
                       ffi::Buffer<ffi::PRED> slot_mask, ffi::Buffer<ffi::S32> coords,
                       ffi::Result<ffi::AnyBuffer> out, int64_t op, int64_t num_ranks,
                       int64_t timeout_ms, std::string_view what) {
  auto slots = slot_row.dimensions();
  int64_t num_tokens = slots[0], top_k = slots.size() > 1 ? slots[1] : 1;
  if (top_k > kMaxSlots) return Invalid("at most 64 slots per token");
  ffi::DataType dtype = rows.element_type();
  if (!Summable(dtype)) return Invalid("exchange_sum adds f16, bf16, f32 or f64 rows only");
  Call call;
  ffi::Error begun = Begin(stream, device, run.run_id, rows, nullptr, 0, send_sizes, coords,
                           num_ranks, op, timeout_ms, what, &call);
  if (begun.failure()) return End(stream, &call, std::move(begun));
  int64_t width = RowBytes(*out) / static_cast<int64_t>(ffi::ByteWidth(dtype));
  const int32_t* slot = slot_row.typed_data();
  const bool* mask = slot_mask.typed_data();
  void* dst = out->untyped_data();
  int k = static_cast<int>(top_k);
  switch (dtype) {
    case ffi::DataType::F32: LaunchSum<float>(stream, call.table, slot, mask, num_tokens, k, dst, width); break;
    case ffi::DataType::F64: LaunchSum<double>(stream, call.table, slot, mask, num_tokens, k, dst, width); break;
    case ffi::DataType::BF16: LaunchSum<__nv_bfloat16>(stream, call.table, slot, mask, num_tokens, k, dst, width); break;
    default: LaunchSum<__half>(stream, call.table, slot, mask, num_tokens, k, dst, width); break;
  }
  return End(stream, &call, ffi::Error::Success());
}

}  // namespace
}  // namespace jep

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JepRaggedExchange, jep::Exchange,
    jep::BindExchange(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JepRaggedExchangeSum, jep::ExchangeSum,
    jep::BindExchangeSum(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()));
