// Where each received row comes from: the index arithmetic shared by the CPU and CUDA handlers.
//
// Every rank publishes a `Peer`: its rows, the optional index that picks them (row s of its send
// order is rows[index[s]]), and how many send rows go to each rank (peer 0 first, contiguous).
// A receiver `me` pulls: its received rows are peer 0's rows for it, then peer 1's, ... and within
// a peer in that peer's send order. So received row r of `me`, from peer p, is send row
// `send_offset_p[me] + (r - recv_offset[p])` of p.
#ifndef JEP_KERNELS_RAGGED_A2A_ROUTES_H_
#define JEP_KERNELS_RAGGED_A2A_ROUTES_H_

#include <cstdint>

#if defined(__CUDACC__)
#define JEP_HD __host__ __device__
#else
#define JEP_HD
#endif

namespace jep {

// The most ranks one exchange can have (the CUDA kernels take the peer table by value).
constexpr int kMaxPeers = 32;

struct Peer {
  const char* rows;          // [num_rows, row_bytes]
  int64_t num_rows;
  const int32_t* index;      // [index_len] or null: send row s is rows[index[s]] (else rows[s])
  int64_t index_len;
  const int32_t* send_sizes; // [n] in host memory: send rows for each rank
  int64_t row_bytes;
  int32_t device;            // the device ordinal that published it (for peer access, errors)
  void* done = nullptr;      // GPU: the event after which this rank no longer reads its peers
};

// A receiver's view of its n senders: how many rows each sends it, where they land, where they
// start in the sender's send order.
struct Routes {
  int32_t count[kMaxPeers];
  int32_t recv_offset[kMaxPeers];
  int32_t send_offset[kMaxPeers];
  int32_t total;
};

// Host code: reads every peer's send sizes.
inline void ComputeRoutes(const Peer* peers, int n, int me, Routes* routes) {
  int32_t received = 0;
  for (int p = 0; p < n; ++p) {
    int32_t before = 0;
    for (int q = 0; q < me; ++q) before += peers[p].send_sizes[q];
    routes->count[p] = peers[p].send_sizes[me];
    routes->recv_offset[p] = received;
    routes->send_offset[p] = before;
    received += routes->count[p];
  }
  routes->total = received;
}

// The source of received row r: the peer and the row of its `rows`, or false when received row r
// is past the last one or its index points outside the sender's rows (such a row reads as zero).
JEP_HD inline bool Locate(const Peer* peers, const Routes& routes, int n, int64_t r, int* peer,
                          int64_t* row) {
  if (r < 0 || r >= routes.total) return false;
  // The last peer whose rows start at or before r (an empty peer shares its successor's start,
  // so the scan steps past it).
  int p = 0;
  while (p + 1 < n && r >= routes.recv_offset[p + 1]) ++p;
  int64_t s = routes.send_offset[p] + (r - routes.recv_offset[p]);
  const Peer& src = peers[p];
  if (src.index != nullptr) {
    if (s >= src.index_len) return false;
    s = src.index[s];
  }
  if (s < 0 || s >= src.num_rows) return false;
  *peer = p;
  *row = s;
  return true;
}

// Where received row r lies in its sender's memory (rows of `row_bytes`), or null where `Locate`
// finds none (the row reads as zero).
JEP_HD inline const char* SourceRow(const Peer* peers, const Routes& routes, int n, int64_t r,
                                    int64_t row_bytes) {
  int p;
  int64_t s;
  return Locate(peers, routes, n, r, &p, &s) ? peers[p].rows + s * row_bytes : nullptr;
}

}  // namespace jep

#endif  // JEP_KERNELS_RAGGED_A2A_ROUTES_H_
