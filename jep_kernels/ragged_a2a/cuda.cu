// The ragged all-to-all on NVIDIA GPUs: each device's kernel reads its received rows straight out
// of its peers' memory over NVLink (peer access between the GPUs of this process).
//
// The same two handlers as cpu.cc, with the same routes (routes.h) and rendezvous (rendezvous.h):
//   JepRaggedExchange:    out[r] = received row r, zeros past the last; with an expansion,
//                         received row r goes to out[dest[r, j]], zeros from `filled` on.
//   JepRaggedExchangeSum: out[t] = sum over j with mask[t, j] of received row slot_row[t, j],
//                         added in float32 in slot order, rounded once (to nearest even).
//
// One call: copy this rank's send sizes and coordinates to the host and wait for the stream (so
// this rank's inputs are complete), meet the peers (exchanging pointers and sizes), launch the
// pull kernel, and meet the peers once more to make each stream wait for the others' kernels
// (events: the host does not wait for them), so no buffer is reused while a peer reads it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
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

// The event each device records after its kernel, one per device for the process: a call
// records it only once every peer has queued its wait on the previous record (End).
cudaEvent_t DoneEvent(int device) {
  static std::mutex mutex;
  static std::vector<cudaEvent_t> events;
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(events.size()) <= device) events.resize(device + 1, nullptr);
  if (events[device] == nullptr) cudaEventCreateWithFlags(&events[device], cudaEventDisableTiming);
  return events[device];
}

// Makes this rank's stream, and so whatever XLA runs next on it, wait for every peer's kernel:
// until then they may read this rank's buffers. The host does not wait for the GPU. Runs also
// when the call failed after meeting its peers.
ffi::Error End(cudaStream_t stream, Call* call, ffi::Error result) {
  if (result.success()) {
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) result = CudaError(status, "launching the kernel");
  }
  if (!call->met) return result;
  Peer self{};
  self.done = DoneEvent(call->peers[call->site.rank].device);
  cudaError_t recorded = cudaEventRecord(static_cast<cudaEvent_t>(self.done), stream);
  if (recorded != cudaSuccess) {  // peers wait on the event's last record then: no harm
    if (result.success()) result = CudaError(recorded, "recording the kernel's end");
  }
  // Every joiner's waits are queued before any of them returns, so before any re-records.
  cudaError_t waited = cudaSuccess;
  auto wait_for_peers = [&](const std::vector<Peer>& peers) {
    for (int p = 0; p < static_cast<int>(peers.size()); ++p) {
      if (p == call->site.rank) continue;
      cudaError_t status = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(peers[p].done), 0);
      if (status != cudaSuccess) waited = status;
    }
  };
  if (auto failure = Meetings().JoinAndWait(call->site, 1, self, nullptr, wait_for_peers)) {
    return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, *failure);
  }
  if (waited != cudaSuccess && result.success()) result = CudaError(waited, "waiting for peers");
  return result;
}

int Blocks(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks));
}

// --- exchange: one warp per received row, 16-byte words where the rows allow ---------------

constexpr int kUnroll = 4;  // words a lane has in flight: remote reads are slow to answer

// Reads a chunk of up to kUnroll words a lane (zeros for a null source) ...
template <typename Word>
__device__ void LoadChunk(const char* src, int64_t base, int64_t words, Word (&chunk)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    int64_t i = base + u * 32;
    chunk[u] = (src != nullptr && i < words) ? reinterpret_cast<const Word*>(src)[i] : Word{};
  }
}

// ... and writes it to one row.
template <typename Word>
__device__ void StoreChunk(char* dst, int64_t base, int64_t words, const Word (&chunk)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    int64_t i = base + u * 32;
    if (i < words) reinterpret_cast<Word*>(dst)[i] = chunk[u];
  }
}

// Where received row r lies in its sender's memory, or null (a zero row): routes.h's SourceRow.
__device__ const char* SourceRow(const PeerTable& table, int64_t r, int64_t row_bytes) {
  return SourceRow(table.peers, table.routes, table.n, r, row_bytes);
}

template <typename Word>
__global__ void ExchangeKernel(PeerTable table, char* out, int64_t out_rows, int64_t row_bytes) {
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + warp; r < out_rows; r += warps) {
    const char* src = SourceRow(table, r, row_bytes);
    for (int64_t base = lane; base < words; base += 32 * kUnroll) {
      Word chunk[kUnroll];
      LoadChunk<Word>(src, base, words, chunk);
      StoreChunk<Word>(out + r * row_bytes, base, words, chunk);
    }
  }
}

// The expansion: received row r, read once, written to each of its rows dest[r, j] of `out`.
template <typename Word>
__global__ void ExpandKernel(PeerTable table, Expansion expansion, char* out, int64_t out_rows,
                             int64_t row_bytes) {
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + warp; r < expansion.received; r += warps) {
    const int32_t* dest = expansion.dest + r * expansion.k;
    bool any = false;
    for (int64_t j = 0; j < expansion.k; ++j) any |= dest[j] >= 0 && dest[j] < out_rows;
    if (!any) continue;
    const char* src = SourceRow(table, r, row_bytes);
    for (int64_t base = lane; base < words; base += 32 * kUnroll) {
      Word chunk[kUnroll];
      LoadChunk<Word>(src, base, words, chunk);
      for (int64_t j = 0; j < expansion.k; ++j) {
        if (dest[j] >= 0 && dest[j] < out_rows) {
          StoreChunk<Word>(out + dest[j] * row_bytes, base, words, chunk);
        }
      }
    }
  }
}

// Zeros the rows of `out` from *filled on (the expansion fills the rows before).
template <typename Word>
__global__ void ZeroTailKernel(char* out, int64_t out_rows, int64_t row_bytes,
                               const int32_t* filled) {
  int64_t first = *filled < 0 ? 0 : (*filled > out_rows ? out_rows : *filled);
  int64_t words = (out_rows - first) * row_bytes / static_cast<int64_t>(sizeof(Word));
  Word* tail = reinterpret_cast<Word*>(out + first * row_bytes);
  int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += threads) {
    tail[i] = Word{};
  }
}

template <typename Word>
void LaunchExchange(cudaStream_t stream, const PeerTable& table, const Expansion* expansion,
                    char* out, int64_t out_rows, int64_t row_bytes) {
  if (expansion == nullptr) {
    ExchangeKernel<Word><<<Blocks(out_rows, kThreads / 32), kThreads, 0, stream>>>(
        table, out, out_rows, row_bytes);
    return;
  }
  int64_t tail_words = out_rows * row_bytes / static_cast<int64_t>(sizeof(Word));
  ZeroTailKernel<Word><<<Blocks(tail_words, kThreads * 4), kThreads, 0, stream>>>(
      out, out_rows, row_bytes, expansion->filled);
  ExpandKernel<Word><<<Blocks(expansion->received, kThreads / 32), kThreads, 0, stream>>>(
      table, *expansion, out, out_rows, row_bytes);
}

ffi::Error Exchange(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer rows,
                    ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::S32> send_sizes,
                    ffi::Buffer<ffi::S32> coords, ffi::Buffer<ffi::S32> expand,
                    ffi::Buffer<ffi::S32> filled, ffi::Result<ffi::AnyBuffer> out, int64_t op,
                    int64_t num_ranks, bool has_index, bool has_expand, int64_t timeout_ms,
                    std::string_view what) {
  Call call;
  ffi::Error begun = Begin(stream, device, run.run_id, rows,
                           has_index ? index.typed_data() : nullptr,
                           static_cast<int64_t>(index.element_count()), send_sizes, coords,
                           num_ranks, op, timeout_ms, what, &call);
  if (begun.failure()) return End(stream, &call, std::move(begun));
  int64_t out_rows = NumRows(*out), row_bytes = RowBytes(*out);
  char* dst = static_cast<char*>(out->untyped_data());
  Expansion expansion = ExpansionOf(expand, filled);
  const Expansion* expanding = has_expand ? &expansion : nullptr;
  if (row_bytes % 16 == 0) {
    LaunchExchange<int4>(stream, call.table, expanding, dst, out_rows, row_bytes);
  } else if (row_bytes % 4 == 0) {
    LaunchExchange<int32_t>(stream, call.table, expanding, dst, out_rows, row_bytes);
  } else {
    LaunchExchange<char>(stream, call.table, expanding, dst, out_rows, row_bytes);
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
      int j = threadIdx.x;
      sources[j] = slot_mask[t * top_k + j]
                       ? reinterpret_cast<const T*>(SourceRow(table, slot_row[t * top_k + j],
                                                              width * sizeof(T)))
                       : nullptr;
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

// 1 when every pair of this process's first `n` GPUs has peer access, else 0 (for `auto`).
extern "C" int JepPeersReachable(int n) {
  for (int a = 0; a < n; ++a) {
    for (int b = 0; b < n; ++b) {
      int can = 0;
      if (a != b && (cudaDeviceCanAccessPeer(&can, a, b) != cudaSuccess || !can)) return 0;
    }
  }
  return 1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JepRaggedExchange, jep::Exchange,
    jep::BindExchange(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JepRaggedExchangeSum, jep::ExchangeSum,
    jep::BindExchangeSum(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()));
