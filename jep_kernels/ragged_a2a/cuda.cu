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
//
// The two low-latency calls (JepLowLatencyDispatch, JepLowLatencyCombine) work the other way:
// they push into buffers kept between calls and never wait on the host (their section below).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <utility>
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
  std::vector<int32_t> host;  // coords (group, rank, op), then this rank's send sizes
  std::vector<Peer> peers;
  PeerTable table;
  bool met = false;  // joined the peers: must wait for them before returning
};

// Copies coords and sizes to the host, meets the peers and computes this rank's routes.
ffi::Error Begin(cudaStream_t stream, int32_t device, int64_t run, const ffi::AnyBuffer& rows,
                 const int32_t* index, int64_t index_len, const ffi::Buffer<ffi::S32>& send_sizes,
                 const ffi::Buffer<ffi::S32>& coords, int64_t num_ranks, int64_t timeout_ms,
                 std::string_view what, Call* call) {
  if (num_ranks < 1 || num_ranks > kMaxPeers) {
    return Invalid("1 to " + std::to_string(kMaxPeers) + " ranks, got " + std::to_string(num_ranks));
  }
  if (static_cast<int64_t>(send_sizes.element_count()) != num_ranks) {
    return Invalid("send_sizes must have one entry per rank");
  }
  if (coords.element_count() != 3) return Invalid("coords must be (group, rank, op)");
  JEP_CUDA(cudaSetDevice(device), "cudaSetDevice");
  call->host.resize(3 + num_ranks);
  JEP_CUDA(cudaMemcpyAsync(call->host.data(), coords.typed_data(), 3 * sizeof(int32_t),
                           cudaMemcpyDeviceToHost, stream), "copying coords");
  JEP_CUDA(cudaMemcpyAsync(call->host.data() + 3, send_sizes.typed_data(),
                           num_ranks * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
           "copying send sizes");
  JEP_CUDA(cudaStreamSynchronize(stream), "waiting for the inputs");
  call->site = CallSite{run, call->host[2], call->host[0], call->host[1],
                        static_cast<int32_t>(num_ranks), timeout_ms, std::string(what)};
  if (call->site.rank < 0 || call->site.rank >= num_ranks) return Invalid("rank out of range");
  Peer self{static_cast<const char*>(rows.untyped_data()), NumRows(rows), index, index_len,
            call->host.data() + 3, RowBytes(rows), device};
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
                    ffi::Buffer<ffi::S32> filled, ffi::Result<ffi::AnyBuffer> out,
                    int64_t num_ranks, bool has_index, bool has_expand, int64_t timeout_ms,
                    std::string_view what) {
  Call call;
  ffi::Error begun = Begin(stream, device, run.run_id, rows,
                           has_index ? index.typed_data() : nullptr,
                           static_cast<int64_t>(index.element_count()), send_sizes, coords,
                           num_ranks, timeout_ms, what, &call);
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
                       ffi::Result<ffi::AnyBuffer> out, int64_t num_ranks,
                       int64_t timeout_ms, std::string_view what) {
  auto slots = slot_row.dimensions();
  int64_t num_tokens = slots[0], top_k = slots.size() > 1 ? slots[1] : 1;
  if (top_k > kMaxSlots) return Invalid("at most 64 slots per token");
  ffi::DataType dtype = rows.element_type();
  if (!Summable(dtype)) return Invalid("exchange_sum adds f16, bf16, f32 or f64 rows only");
  Call call;
  ffi::Error begun = Begin(stream, device, run.run_id, rows, nullptr, 0, send_sizes, coords,
                           num_ranks, timeout_ms, what, &call);
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

// --- the low-latency calls (low_latency.h): pushes into buffers kept between calls ----------
//
// Each call, on each device, uses one allocation laid out by `LowLatencyLayout`: its owner's set
// of the call's kind and shape (buffer_sets.h), made and zeroed on the first run of such a call,
// when the devices exchange their addresses on the host (and enable peer access). Every later
// run only launches kernels:
//   dispatch: send (a block a row and peer: each rank writes its rows and their slots into
//             every peer's buffers, then adds one to the peer's `arrived` counter), plan (waits
//             for every sender's blocks of this call, then the group sizes, low_latency.h),
//             place (a block a received row: to its expert rows; more blocks zero the tail),
//             finish (tell every sender its rows were read: `ack`, and count the call: `seq`);
//   combine:  return (a block a row and peer: each expert rank adds a row's pairs with their
//             weights and writes the sum into its home's buffers), home (waits, then a block a
//             token adds its rows), finish.
// A sender waits for `ack` from the previous call before it overwrites a peer's buffers. The
// counters only grow, so no kernel resets them. Nothing waits on the host, so XLA may capture
// the calls into command buffers.

struct LowLatencyLayout {
  int64_t n, tokens, k, experts, row_bytes;
  // Byte offsets in a device's allocation.
  int64_t arrived, ack, seq, within, start, kept, counts, rows_from, local, index, weight, rows;
  int64_t total;
};

LowLatencyLayout MakeLayout(const LowLatencyShape& shape) {
  LowLatencyLayout l{shape.n, shape.tokens, shape.k, shape.experts, shape.row_bytes};
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    int64_t here = at;
    at += (bytes + 255) / 256 * 256;
    return here;
  };
  int64_t n = l.n, pairs = l.n * l.tokens * l.k;
  l.arrived = take(n * 8);
  l.ack = take(n * 8);
  l.seq = take(8);
  l.within = take(l.experts * n * 4);
  l.start = take(l.experts * 4);
  l.kept = take(4);
  l.counts = take(n * l.experts * 4);
  l.rows_from = take(n * 4);
  l.local = take(pairs * 4);
  l.index = take(pairs * 4);
  l.weight = take(pairs * 4);
  l.rows = take(n * l.tokens * l.row_bytes);
  l.total = at;
  return l;
}

struct LowLatencyArgs {
  LowLatencyLayout layout;
  char* self;              // this device's allocation
  char* peers[kMaxPeers];  // every rank's, by rank (this one's among them)
  int me;
  int blocks;              // sending blocks per peer: each adds one to the peer's `arrived`
  uint64_t timeout_ns;
};

template <typename T>
__host__ __device__ T* At(char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__device__ uint64_t GlobalTimer() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// Spins until *word >= target. Past the timeout it says which rank never came and stops the
// program (the error surfaces in the host's next wait on the device).
__device__ void WaitFor(char* base, int64_t offset, int slot, uint64_t target,
                        const LowLatencyArgs& a, int peer, const char* what) {
  const volatile uint64_t* word = At<uint64_t>(base, offset) + slot;
  uint64_t start = GlobalTimer();
  while (*word < target) {
    if (GlobalTimer() - start > a.timeout_ns) {
      printf("jep ffi transport: low-latency %s: rank %d waited %.1f s for rank %d, which never "
             "arrived. Every device of the EP axis must run the same program; the timeout is "
             "the calls' timeout_s (default JEP_FFI_TIMEOUT_S, read at trace time).\n",
             what, a.me, a.timeout_ns * 1e-9, peer);
      __trap();
    }
  }
  __threadfence_system();
}

__device__ uint64_t Sequence(const LowLatencyArgs& a) {
  return *At<volatile uint64_t>(a.self, a.layout.seq) + 1;
}

// After this block's writes into `to`: one more arrival there.
__device__ void Arrive(const LowLatencyArgs& a, char* to) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd_system(reinterpret_cast<unsigned long long*>(At<uint64_t>(to, a.layout.arrived)) +
                         a.me, 1ull);
  }
}

// dispatch, on the sender: block (j, p) writes row j for rank p (the j-th of its send order)
// and its slots into p's buffers; block (0, p) also the counts.
template <typename Word>
__global__ void LowLatencySendKernel(LowLatencyArgs a, const char* x, int64_t x_rows,
                                     const int32_t* send_index, const int32_t* pair_local,
                                     const int32_t* pair_index, const float* pair_weight,
                                     const int32_t* counts, const int32_t* rows_to) {
  const LowLatencyLayout& l = a.layout;
  int64_t j = blockIdx.x;
  int p = blockIdx.y;
  if (threadIdx.x == 0) WaitFor(a.self, l.ack, p, Sequence(a) - 1, a, p, "dispatch");
  __syncthreads();
  char* to = a.peers[p];
  int64_t T = l.tokens, k = l.k;
  if (j < rows_to[p]) {
    int64_t token = send_index[p * T + j];
    const char* src = token >= 0 && token < x_rows ? x + token * l.row_bytes : nullptr;
    char* dst = to + l.rows + (a.me * T + j) * l.row_bytes;
    int64_t words = l.row_bytes / static_cast<int64_t>(sizeof(Word));
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
      reinterpret_cast<Word*>(dst)[i] = src != nullptr ? reinterpret_cast<const Word*>(src)[i] : Word{};
    }
    if (threadIdx.x < k) {
      int64_t from = (p * T + j) * k + threadIdx.x, at = (a.me * T + j) * k + threadIdx.x;
      At<int32_t>(to, l.local)[at] = pair_local[from];
      At<int32_t>(to, l.index)[at] = pair_index[from];
      At<float>(to, l.weight)[at] = pair_weight[from];
    }
  }
  if (j == 0) {
    for (int64_t e = threadIdx.x; e < l.experts; e += blockDim.x) {
      At<int32_t>(to, l.counts)[a.me * l.experts + e] = counts[p * l.experts + e];
    }
    if (threadIdx.x == 0) At<int32_t>(to, l.rows_from)[a.me] = rows_to[p];
  }
  Arrive(a, to);
}

// Waits until every sender's blocks of this call have arrived (thread s for sender s).
__device__ void WaitForSenders(const LowLatencyArgs& a, const char* what) {
  uint64_t target = Sequence(a) * static_cast<uint64_t>(a.blocks);
  for (int src = threadIdx.x; src < a.layout.n; src += blockDim.x) {
    WaitFor(a.self, a.layout.arrived, src, target, a, src, what);
  }
  __syncthreads();
}

// dispatch, on the receiver (one block): wait for the senders, then plan the expert rows
// (low_latency.h), in shared memory when the counts fit there.
__global__ void LowLatencyPlanKernel(LowLatencyArgs a, int64_t capacity, bool in_shared,
                                     int32_t* group_sizes, int32_t* recv_count, int32_t* dropped) {
  extern __shared__ int32_t plan[];
  const LowLatencyLayout& l = a.layout;
  WaitForSenders(a, "dispatch");
  int n = static_cast<int>(l.n), experts = static_cast<int>(l.experts);
  int32_t* within = At<int32_t>(a.self, l.within);
  int32_t* start = At<int32_t>(a.self, l.start);
  int32_t* kept = At<int32_t>(a.self, l.kept);
  const int32_t* counts = At<int32_t>(a.self, l.counts);
  for (int src = threadIdx.x; src < n; src += blockDim.x) {
    recv_count[src] = At<int32_t>(a.self, l.rows_from)[src];
  }
  if (!in_shared) {
    if (threadIdx.x == 0) PlanGroups(counts, n, experts, capacity, within, start, group_sizes, kept, dropped);
    return;
  }
  int32_t *s_counts = plan, *s_within = plan + n * experts, *s_start = s_within + n * experts;
  int32_t *s_sizes = s_start + experts, *s_totals = s_sizes + experts;
  for (int i = threadIdx.x; i < n * experts; i += blockDim.x) s_counts[i] = counts[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    PlanGroups(s_counts, n, experts, capacity, s_within, s_start, s_sizes, s_totals, s_totals + 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n * experts; i += blockDim.x) within[i] = s_within[i];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    start[e] = s_start[e];
    group_sizes[e] = s_sizes[e];
  }
  if (threadIdx.x == 0) {
    *kept = s_totals[0];
    *dropped = s_totals[1];
  }
}

// Bytes of shared memory the plan takes (0: it plans in global memory).
size_t PlanSharedBytes(const LowLatencyLayout& l) {
  size_t bytes = (2 * l.n * l.experts + 2 * l.experts + 2) * sizeof(int32_t);
  return bytes <= 48 * 1024 ? bytes : 0;
}

// dispatch, on the receiver: block r < n * T places received row r (from rank r / T) at its
// slots' expert rows; the blocks after it zero the rows of recv_x past the kept ones.
template <typename Word>
__global__ void LowLatencyPlaceKernel(LowLatencyArgs a, const int32_t* group_sizes, char* recv_x,
                                      int64_t out_rows, int32_t* pair_row, float* recv_weight) {
  __shared__ int32_t dest[32];
  const LowLatencyLayout& l = a.layout;
  int64_t T = l.tokens, k = l.k, words = l.row_bytes / static_cast<int64_t>(sizeof(Word));
  int64_t received = l.n * T;
  if (blockIdx.x >= received) {  // the tail
    int64_t first = *At<int32_t>(a.self, l.kept);
    Word* tail = reinterpret_cast<Word*>(recv_x + first * l.row_bytes);
    int64_t tail_words = (out_rows - first) * words;
    int64_t threads = (gridDim.x - received) * static_cast<int64_t>(blockDim.x);
    for (int64_t i = (blockIdx.x - received) * blockDim.x + threadIdx.x; i < tail_words;
         i += threads) {
      tail[i] = Word{};
    }
    return;
  }
  int64_t r = blockIdx.x;
  int src = static_cast<int>(r / T);
  bool here = r % T < At<int32_t>(a.self, l.rows_from)[src];
  int32_t none = static_cast<int32_t>(out_rows);
  if (threadIdx.x < k) {
    int32_t q = none;
    float weight = 0.0f;
    if (here) {
      q = PairRow(At<int32_t>(a.self, l.within), At<int32_t>(a.self, l.start), group_sizes,
                  static_cast<int>(l.n), static_cast<int>(l.experts), src,
                  At<int32_t>(a.self, l.local)[r * k + threadIdx.x],
                  At<int32_t>(a.self, l.index)[r * k + threadIdx.x], none);
      weight = At<float>(a.self, l.weight)[r * k + threadIdx.x];
    }
    dest[threadIdx.x] = q;
    pair_row[r * k + threadIdx.x] = q;
    recv_weight[r * k + threadIdx.x] = weight;
  }
  __syncthreads();
  if (!here) return;
  const Word* row = reinterpret_cast<const Word*>(a.self + l.rows + r * l.row_bytes);
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
    Word word = row[i];
    for (int s = 0; s < k; ++s) {
      if (dest[s] < out_rows) reinterpret_cast<Word*>(recv_x + dest[s] * l.row_bytes)[i] = word;
    }
  }
}

// The call is done with this rank's buffers: tell every sender, and count the call.
__global__ void LowLatencyFinishKernel(LowLatencyArgs a) {
  uint64_t seq = Sequence(a);
  __syncthreads();
  __threadfence_system();
  for (int p = threadIdx.x; p < a.layout.n; p += blockDim.x) {
    *(At<volatile uint64_t>(a.peers[p], a.layout.ack) + a.me) = seq;
  }
  __syncthreads();
  if (threadIdx.x == 0) *At<volatile uint64_t>(a.self, a.layout.seq) = seq;
}

// Elements of T in 16 bytes: what a thread of the combine kernels reads at a time.
template <typename T>
constexpr int kVectorOf = sizeof(T) < 16 ? 16 / sizeof(T) : 1;

// Piece c (kVector elements, or one where the row is not made of whole vectors) of
// sum_s weight[s] * source[s] in float32, in slot order: fused multiply-adds with weights,
// plain adds without.
template <typename T>
__device__ void AddPiece(const T* const* sources, const float* weights, int k, int64_t c,
                         bool vectors, float* total) {
  constexpr int kVector = kVectorOf<T>;
  int step = vectors ? kVector : 1;
  for (int i = 0; i < step; ++i) total[i] = 0.0f;
  for (int s = 0; s < k; ++s) {
    if (sources[s] == nullptr) continue;
    T value[kVector];
    if (vectors) {
      *reinterpret_cast<int4*>(value) = reinterpret_cast<const int4*>(sources[s])[c];
    } else {
      value[0] = sources[s][c];
    }
    for (int i = 0; i < step; ++i) {
      total[i] = weights != nullptr ? __fmaf_rn(ToF32(value[i]), weights[s], total[i])
                                    : total[i] + ToF32(value[i]);
    }
  }
}

template <typename T>
__device__ void StorePiece(T* row, int64_t c, bool vectors, const float* total) {
  constexpr int kVector = kVectorOf<T>;
  T out[kVector];
  int step = vectors ? kVector : 1;
  for (int i = 0; i < step; ++i) out[i] = FromF32<T>(total[i]);
  if (vectors) {
    reinterpret_cast<int4*>(row)[c] = *reinterpret_cast<int4*>(out);
  } else {
    row[c] = out[0];
  }
}

// combine, on the expert rank: block (j, p) adds row j from rank p's pairs times their weights
// (float32, in slot order), rounds once and writes the sum into p's buffers.
template <typename T>
__global__ void LowLatencyReturnKernel(LowLatencyArgs a, const T* y, int64_t y_rows,
                                       const int32_t* pair_row, const float* recv_weight,
                                       const int32_t* recv_count, int64_t width) {
  __shared__ const T* sources[32];
  __shared__ float weights[32];
  const LowLatencyLayout& l = a.layout;
  int64_t j = blockIdx.x;
  int p = blockIdx.y;
  if (threadIdx.x == 0) WaitFor(a.self, l.ack, p, Sequence(a) - 1, a, p, "combine");
  int64_t T_rows = l.tokens, k = l.k, r = p * T_rows + j;
  if (threadIdx.x < k && j < T_rows) {
    int32_t q = pair_row[r * k + threadIdx.x];
    sources[threadIdx.x] = q >= 0 && q < y_rows ? y + q * width : nullptr;
    weights[threadIdx.x] = recv_weight[r * k + threadIdx.x];
  }
  __syncthreads();
  char* to = a.peers[p];
  if (j < recv_count[p]) {
    T* dst = reinterpret_cast<T*>(to + l.rows + (a.me * T_rows + j) * l.row_bytes);
    bool vectors = width % kVectorOf<T> == 0;
    int64_t pieces = vectors ? width / kVectorOf<T> : width;
    for (int64_t c = threadIdx.x; c < pieces; c += blockDim.x) {
      float total[kVectorOf<T>];
      AddPiece<T>(sources, weights, static_cast<int>(k), c, vectors, total);
      StorePiece<T>(dst, c, vectors, total);
    }
  }
  Arrive(a, to);
}

// combine, at home: block t waits for the expert ranks, then adds token t's rows from the ranks
// it reached, in float32 in slot order.
template <typename T>
__global__ void LowLatencyHomeKernel(LowLatencyArgs a, const int32_t* home_slot, T* out,
                                     int64_t width) {
  __shared__ const T* sources[32];
  const LowLatencyLayout& l = a.layout;
  WaitForSenders(a, "combine");
  int64_t T_rows = l.tokens, k = l.k, t = blockIdx.x;
  if (t >= T_rows) return;
  if (threadIdx.x < k) {
    int32_t slot = home_slot[t * k + threadIdx.x];
    sources[threadIdx.x] = slot >= 0 && slot < l.n * T_rows
        ? reinterpret_cast<const T*>(a.self + l.rows + slot * l.row_bytes) : nullptr;
  }
  __syncthreads();
  bool vectors = width % kVectorOf<T> == 0;
  int64_t pieces = vectors ? width / kVectorOf<T> : width;
  for (int64_t c = threadIdx.x; c < pieces; c += blockDim.x) {
    float total[kVectorOf<T>];
    AddPiece<T>(sources, nullptr, static_cast<int>(k), c, vectors, total);
    StorePiece<T>(out + t * width, c, vectors, total);
  }
}

// What a device publishes when its set is made: its allocation.
struct LowLatencyBuffers {
  char* base = nullptr;
  int32_t device = -1;
};

Rendezvous<LowLatencyBuffers>& BufferMeetings() {
  static auto* meetings = new Rendezvous<LowLatencyBuffers>();
  return *meetings;
}

// A device's set: every rank's allocation, by rank (its own at `me`).
struct LowLatencySet {
  std::vector<LowLatencyBuffers> peers;
  int me = 0;
  int64_t bytes = 0;
};

BufferSets<LowLatencySet>& LowLatencySets() {
  static auto* sets = new BufferSets<LowLatencySet>();
  return *sets;
}

// Allocates and zeroes this device's buffers of `key` and meets the peers for theirs.
ffi::Error MakeLowLatencySet(const BufferSetKey& key, int64_t run, int64_t group, int me,
                             int64_t timeout_ms, std::string_view what, int64_t bytes,
                             LowLatencySet* set) {
  // XLA may be capturing this stream into a command buffer: allocate and zero outside it.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  LowLatencyBuffers self{nullptr, key.device};
  cudaStream_t side = nullptr;
  cudaError_t status = cudaSetDevice(key.device);
  if (status == cudaSuccess) status = cudaMalloc(&self.base, bytes);
  if (status == cudaSuccess) status = cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  if (status == cudaSuccess) status = cudaMemsetAsync(self.base, 0, bytes, side);
  if (status == cudaSuccess) status = cudaStreamSynchronize(side);
  if (side != nullptr) cudaStreamDestroy(side);
  ffi::Error result = status == cudaSuccess
                          ? ffi::Error::Success()
                          : CudaError(status, "allocating the low-latency buffers");
  std::vector<LowLatencyBuffers> peers = {self};
  if (result.success() && key.n > 1) {
    CallSite site{run, key.MeetingOp(), group, me, static_cast<int32_t>(key.n), timeout_ms,
                  std::string(what)};
    BufferMeetings().Number(site);
    if (auto failure = BufferMeetings().JoinAndWait(site, 0, self, &peers)) {
      result = ffi::Error(ffi::ErrorCode::kDeadlineExceeded, *failure);
    } else {
      std::vector<Peer> devices(peers.size());
      for (size_t p = 0; p < peers.size(); ++p) devices[p].device = peers[p].device;
      result = EnablePeerAccess(key.device, devices);
    }
  }
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (result.failure()) {
    if (self.base != nullptr) cudaFree(self.base);
    return result;
  }
  *set = LowLatencySet{std::move(peers), me, bytes};
  return ffi::Error::Success();
}

// This device's buffers for a call of `kind` and `shape` with every peer's: its owner's set,
// made on the first run of such a call.
ffi::Error LowLatencyPrepare(int32_t device, int64_t run, int64_t owner, LowLatencyKind kind,
                             int64_t num_ranks, int64_t timeout_ms, std::string_view what,
                             ffi::Span<const int64_t> groups, ffi::Span<const int64_t> ranks,
                             const LowLatencyShape& shape, LowLatencyArgs* args) {
  if (num_ranks < 1 || num_ranks > kMaxPeers) {
    return Invalid("1 to " + std::to_string(kMaxPeers) + " ranks, got " + std::to_string(num_ranks));
  }
  if (device < 0 || device >= static_cast<int64_t>(ranks.size()) || ranks[device] < 0 ||
      ranks[device] >= num_ranks) {
    return Invalid(std::string(what) + ": GPU " + std::to_string(device) +
                   " is not a device of the mesh the call was traced for");
  }
  if (LowLatencySets().Released(owner)) {
    return Invalid(std::string(what) + ": its jep.low_latency.Buffer was released");
  }
  LowLatencyLayout layout = MakeLayout(shape);
  int me = static_cast<int>(ranks[device]);
  *args = LowLatencyArgs{};
  args->layout = layout;
  args->me = me;
  args->timeout_ns = static_cast<uint64_t>(timeout_ms) * 1000000ull;
  BufferSetKey key = KeyOf(owner, kind, shape, device);
  std::optional<LowLatencySet> set = LowLatencySets().Find(key);
  if (!set) {
    LowLatencySet made;
    ffi::Error result = MakeLowLatencySet(key, run, groups[device], me, timeout_ms, what,
                                          layout.total, &made);
    if (result.failure()) return result;
    LowLatencySets().Add(key, made);
    set = std::move(made);
  }
  args->self = set->peers[me].base;
  for (int p = 0; p < num_ranks; ++p) args->peers[p] = set->peers[p].base;
  return ffi::Error::Success();
}

template <typename Word>
void LaunchLowLatencyDispatch(cudaStream_t stream, const LowLatencyArgs& a, const char* x,
                              int64_t x_rows, const int32_t* send_index, const int32_t* local,
                              const int32_t* index, const float* weight, const int32_t* counts,
                              const int32_t* rows_to, int64_t capacity, int32_t* group_sizes,
                              int32_t* recv_count, int32_t* dropped, char* recv_x,
                              int64_t out_rows, int32_t* pair_row, float* recv_weight) {
  const LowLatencyLayout& l = a.layout;
  LowLatencySendKernel<Word><<<dim3(a.blocks, l.n), kThreads, 0, stream>>>(
      a, x, x_rows, send_index, local, index, weight, counts, rows_to);
  size_t shared = PlanSharedBytes(l);
  LowLatencyPlanKernel<<<1, kThreads, shared, stream>>>(a, capacity, shared > 0, group_sizes,
                                                        recv_count, dropped);
  int64_t tail_blocks = Blocks(out_rows * l.row_bytes / static_cast<int64_t>(sizeof(Word)),
                               kThreads * 4);
  LowLatencyPlaceKernel<Word><<<l.n * l.tokens + tail_blocks, kThreads, 0, stream>>>(
      a, group_sizes, recv_x, out_rows, pair_row, recv_weight);
  LowLatencyFinishKernel<<<1, 32, 0, stream>>>(a);
}

ffi::Error LowLatencyDispatch(
    cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x,
    ffi::Buffer<ffi::S32> send_index, ffi::Buffer<ffi::S32> pair_local,
    ffi::Buffer<ffi::S32> pair_index, ffi::Buffer<ffi::F32> pair_weight,
    ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> rows_to, ffi::Buffer<ffi::S32>,
    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
    ffi::Result<ffi::Buffer<ffi::S32>> pair_row, ffi::Result<ffi::Buffer<ffi::F32>> recv_weight,
    ffi::Result<ffi::Buffer<ffi::S32>> recv_count, ffi::Result<ffi::Buffer<ffi::S32>> num_dropped,
    int64_t capacity, int64_t, int64_t owner, int64_t num_ranks, int64_t timeout_ms,
    std::string_view what, ffi::Span<const int64_t> groups, ffi::Span<const int64_t> ranks) {
  auto dims = pair_local.dimensions();
  if (dims.size() != 3 || dims[0] != num_ranks) return Invalid("pair_local must be [n, T, k]");
  if (dims[2] > 32) return Invalid("at most 32 slots per token");
  LowLatencyShape shape{num_ranks, dims[1], dims[2], counts.dimensions()[1], NumRows(*recv_x),
                        RowBytes(*recv_x)};
  LowLatencyArgs a;
  ffi::Error prepared = LowLatencyPrepare(device, run.run_id, owner, LowLatencyKind::kDispatch,
                                          num_ranks, timeout_ms, what, groups, ranks, shape, &a);
  if (prepared.failure()) return prepared;
  a.blocks = static_cast<int>(shape.tokens > 1 ? shape.tokens : 1);  // sending blocks per peer: one a row
  auto launch = [&](auto word) {
    using Word = decltype(word);
    LaunchLowLatencyDispatch<Word>(
        stream, a, static_cast<const char*>(x.untyped_data()), NumRows(x), send_index.typed_data(),
        pair_local.typed_data(), pair_index.typed_data(), pair_weight.typed_data(),
        counts.typed_data(), rows_to.typed_data(), capacity, group_sizes->typed_data(),
        recv_count->typed_data(), num_dropped->typed_data(),
        static_cast<char*>(recv_x->untyped_data()), shape.out_rows, pair_row->typed_data(),
        recv_weight->typed_data());
  };
  if (shape.row_bytes % 16 == 0) {
    launch(int4{});
  } else if (shape.row_bytes % 4 == 0) {
    launch(int32_t{});
  } else {
    launch(char{});
  }
  cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? ffi::Error::Success() : CudaError(status, "launching dispatch");
}

template <typename T>
void LaunchLowLatencyCombine(cudaStream_t stream, const LowLatencyArgs& a, const void* y,
                             int64_t y_rows, const int32_t* pair_row, const float* recv_weight,
                             const int32_t* recv_count, const int32_t* home_slot, void* out) {
  const LowLatencyLayout& l = a.layout;
  int64_t width = l.row_bytes / static_cast<int64_t>(sizeof(T));
  LowLatencyReturnKernel<T><<<dim3(a.blocks, l.n), kThreads, 0, stream>>>(
      a, static_cast<const T*>(y), y_rows, pair_row, recv_weight, recv_count, width);
  LowLatencyHomeKernel<T><<<a.blocks, kThreads, 0, stream>>>(a, home_slot, static_cast<T*>(out),
                                                             width);
  LowLatencyFinishKernel<<<1, 32, 0, stream>>>(a);
}

ffi::Error LowLatencyCombine(
    cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer y,
    ffi::Buffer<ffi::S32> pair_row, ffi::Buffer<ffi::F32> recv_weight,
    ffi::Buffer<ffi::S32> recv_count, ffi::Buffer<ffi::S32> home_slot, ffi::Buffer<ffi::S32>,
    ffi::Result<ffi::AnyBuffer> out, int64_t, int64_t owner, int64_t num_ranks,
    int64_t timeout_ms, std::string_view what, ffi::Span<const int64_t> groups,
    ffi::Span<const int64_t> ranks) {
  ffi::DataType dtype = y.element_type();
  if (!Summable(dtype)) return Invalid("combine adds f16, bf16, f32 or f64 rows only");
  auto slots = home_slot.dimensions();
  if (slots.size() != 2 || slots[1] > 32) return Invalid("home_slot must be [T, k], k <= 32");
  LowLatencyShape shape{num_ranks, slots[0], slots[1], 0, NumRows(y), RowBytes(y)};
  LowLatencyArgs a;
  ffi::Error prepared = LowLatencyPrepare(device, run.run_id, owner, LowLatencyKind::kCombine,
                                          num_ranks, timeout_ms, what, groups, ranks, shape, &a);
  if (prepared.failure()) return prepared;
  a.blocks = static_cast<int>(shape.tokens > 1 ? shape.tokens : 1);  // returning blocks per peer: one a row
  const int32_t* rows = pair_row.typed_data();
  const float* weights = recv_weight.typed_data();
  const int32_t* counts = recv_count.typed_data();
  const int32_t* home = home_slot.typed_data();
  const void* src = y.untyped_data();
  void* dst = out->untyped_data();
  int64_t y_rows = NumRows(y);
  switch (dtype) {
    case ffi::DataType::F32: LaunchLowLatencyCombine<float>(stream, a, src, y_rows, rows, weights, counts, home, dst); break;
    case ffi::DataType::F64: LaunchLowLatencyCombine<double>(stream, a, src, y_rows, rows, weights, counts, home, dst); break;
    case ffi::DataType::BF16: LaunchLowLatencyCombine<__nv_bfloat16>(stream, a, src, y_rows, rows, weights, counts, home, dst); break;
    default: LaunchLowLatencyCombine<__half>(stream, a, src, y_rows, rows, weights, counts, home, dst); break;
  }
  cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? ffi::Error::Success() : CudaError(status, "launching combine");
}

}  // namespace
}  // namespace jep

// Frees the low-latency buffers of `owner` on every device, once the work queued on each is
// done, and refuses its calls from now on. Returns the sets freed, or -1 on a CUDA error.
extern "C" int64_t JepLowLatencyRelease(int64_t owner) {
  int64_t freed = 0;
  bool failed = false;
  for (auto& [key, set] : jep::LowLatencySets().Release(owner)) {
    failed |= cudaSetDevice(key.device) != cudaSuccess;
    failed |= cudaDeviceSynchronize() != cudaSuccess;
    failed |= cudaFree(set.peers[set.me].base) != cudaSuccess;
    ++freed;
  }
  return failed ? -1 : freed;
}

// The low-latency buffer sets live on this process's devices, and their bytes, of `owner` (of
// every owner when owner < 0). A debug counter.
extern "C" void JepLowLatencyLive(int64_t owner, int64_t* sets, int64_t* bytes) {
  jep::LowLatencySets().Count(owner, sets, bytes);
}

// Free memory of GPU `device` as CUDA counts it (every allocation, XLA's and these buffers), or
// -1 on an error. A debug counter, for tests that the buffers come back.
extern "C" int64_t JepDeviceFreeBytes(int device) {
  size_t free = 0, total = 0;
  if (cudaSetDevice(device) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) {
    return -1;
  }
  return static_cast<int64_t>(free);
}

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JepLowLatencyDispatch, jep::LowLatencyDispatch,
    jep::BindLowLatencyDispatch(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JepLowLatencyCombine, jep::LowLatencyCombine,
    jep::BindLowLatencyCombine(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()),
    {ffi::Traits::kCmdBufferCompatible});
