// The unique step of a batch without torch.unique: the flat ids are sorted stably (torch.sort,
// a cub radix sort of (id, position) pairs), then two passes over the sorted list give what
// torch.unique(sorted=True, return_inverse=True, return_counts=True) gives, plus the batch's
// sparse transpose for the backward pass, which is the same sort:
//   sorted_u[p]  the unique row of sorted entry p (the inverse, in sorted order)
//   order[p]     the index of sorted entry p (grouped by row, ascending within a row: stable)
//   start[u]     where row u's entries begin in the sorted list (start[U] = n)
// so that backward needs no second sort. The unique count U stays on the device (rank[n - 1]);
// the caller reads it once to size the outputs.
//
// Shapes: n indices, U unique rows. Keys are int32 (ids of a table of at most 2**31 rows) or
// int64.
#include "common.cuh"

// flag[p] = 1 where sorted entry p starts a new row (p = 0 included), else 0.
template <class Key>
__device__ void unique_flags(const Key* __restrict__ sorted, i64 n, int* __restrict__ flag) {
  for (i64 p = ts_global_thread(); p < n; p += ts_thread_count())
    flag[p] = (p == 0 || sorted[p] != sorted[p - 1]) ? 1 : 0;
}

// rank = inclusive prefix sum of flag: entry p belongs to unique row rank[p] - 1.
template <class Key>
__device__ void unique_scatter(const Key* __restrict__ sorted,  // (n,)
                               const i64* __restrict__ order,   // (n,)
                               const int* __restrict__ rank,    // (n,)
                               i64 n,
                               i64* __restrict__ ids,       // (n,) out, first U used
                               i64* __restrict__ inverse,   // (n,) out
                               int* __restrict__ sorted_u,  // (n,) out
                               i64* __restrict__ start) {   // (n + 1,) out, first U + 1 used
  for (i64 p = ts_global_thread(); p < n; p += ts_thread_count()) {
    const int u = rank[p] - 1;
    sorted_u[p] = u;
    inverse[order[p]] = u;
    if (p == 0 || rank[p - 1] != rank[p]) {
      ids[u] = (i64)sorted[p];
      start[u] = p;
    }
    if (p == n - 1) start[u + 1] = n;
  }
}

#define TS_UNIQUE_KERNELS(SUFFIX, KEY)                                                   \
  extern "C" __global__ void unique_flags_##SUFFIX(const KEY* sorted, i64 n, int* flag) {       \
    unique_flags<KEY>(sorted, n, flag);                                                          \
  }                                                                                              \
  extern "C" __global__ void unique_scatter_##SUFFIX(const KEY* sorted, const i64* order,       \
                                                     const int* rank, i64 n, i64* ids,           \
                                                     i64* inverse, int* sorted_u, i64* start) {  \
    unique_scatter<KEY>(sorted, order, rank, n, ids, inverse, sorted_u, start);                  \
  }
TS_UNIQUE_KERNELS(i32, int)
TS_UNIQUE_KERNELS(i64, i64)
