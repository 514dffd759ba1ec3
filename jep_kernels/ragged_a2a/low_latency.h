// The low-latency exchange's arithmetic, shared by the CPU and CUDA handlers: where each received
// (token, slot) pair lands among the receiver's expert rows.
//
// Every rank sends each of its peers at most T rows (one per token that has an expert there), in
// token order, with each row's k slots: the peer's local expert (or -1) and the pair's index among
// this sender's pairs to that expert. The receiver lays its expert rows out by local expert, and
// within an expert by sender, then by the sender's order: the order `jep.dispatch` uses, so the
// two give the same rows. With a capacity, an expert keeps its first `capacity` pairs.
#ifndef JEP_KERNELS_RAGGED_A2A_LOW_LATENCY_H_
#define JEP_KERNELS_RAGGED_A2A_LOW_LATENCY_H_

#include <cstdint>

#include "routes.h"  // JEP_HD

namespace jep {

// The receiver's plan, from counts[src * E + e] (pairs sender src sends to local expert e):
//   within[e * n + src]: the position in expert e of src's first pair;
//   start[e], group_sizes[e]: expert e's first row and its rows kept (at most `capacity`,
//     none when capacity < 0);
//   *kept: rows kept in all, *dropped: pairs that did not fit.
JEP_HD inline void PlanGroups(const int32_t* counts, int n, int num_experts, int64_t capacity,
                              int32_t* within, int32_t* start, int32_t* group_sizes,
                              int32_t* kept, int32_t* dropped) {
  int32_t offset = 0, lost = 0;
  for (int e = 0; e < num_experts; ++e) {
    int32_t total = 0;
    for (int src = 0; src < n; ++src) {
      within[e * n + src] = total;
      total += counts[src * num_experts + e];
    }
    int32_t fits = capacity < 0 || total <= capacity ? total : static_cast<int32_t>(capacity);
    start[e] = offset;
    group_sizes[e] = fits;
    offset += fits;
    lost += total - fits;
  }
  *kept = offset;
  *dropped = lost;
}

// The row of pair (src, local expert e, index among src's pairs to e), or `none` (no expert, or
// past the capacity).
JEP_HD inline int32_t PairRow(const int32_t* within, const int32_t* start,
                              const int32_t* group_sizes, int n, int num_experts, int src, int32_t e,
                              int32_t index, int32_t none) {
  if (e < 0 || e >= num_experts || index < 0) return none;
  int32_t position = within[e * n + src] + index;
  return position < group_sizes[e] ? start[e] + position : none;
}

}  // namespace jep

#endif  // JEP_KERNELS_RAGGED_A2A_LOW_LATENCY_H_
