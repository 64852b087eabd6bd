// The unique step of a batch without torch.unique: the flat ids are sorted stably with their
// positions (sort.cu's radix sort over the ids' bits for tables of at most 2**31 rows, else
// torch.sort), then two passes over the sorted list give what
// torch.unique(sorted=True, return_inverse=True, return_counts=True) gives, plus the batch's
// sparse transpose for the backward pass, which is the same sort (so backward needs no second
// sort):
//   start[u]        where row u's entries begin in the sorted list (start[U] = n)
//   multi_u[m]      the sorted entries of the rows read more than once, in sorted order: the
//   multi_index[m]  unique row and the index of each (grouped by row, ascending within a row)
//   multi_first[u]  where row u's entries begin in that list (rows read more than once only)
// A uniform batch reads most rows once: backward updates those bag by bag (the single flag of
// each index's place picks them out) and sums the gradients of the others over the short list
// alone.
// A batch with a transpose gets no inverse here: its one use in a training step, each index's
// row slot, is written from the sorted list once the cache step has placed the rows
// (scatter_places), and the inverse (a random write per index, like the places) would be a
// second scatter of the same entries. cuda.py Transpose.inverse makes it where it is asked for.
// The counts stay on the device: U and the list's length are the two halves of the last entry
// of the prefix sum; the caller reads U once to size the outputs, or not at all (sync-free).
//
// Shapes: n indices, U unique rows. Keys and positions are int32 (ids of a table of at most
// 2**31 rows: sort.cu) or int64 (torch.sort).
#include "common.cuh"

// flags[p] = (sorted entry p starts a new row) + ((its row has more than one entry) << 32), so
// that one inclusive prefix sum counts both: rows begun, and entries of rows read more than once.
template <class Key>
__device__ void unique_flags(const Key* __restrict__ sorted, i64 n, i64* __restrict__ flags) {
  for (i64 p = ts_global_thread(); p < n; p += ts_thread_count()) {
    const Key k = sorted[p];
    const bool same_before = p > 0 && sorted[p - 1] == k;
    const bool same_after = p + 1 < n && sorted[p + 1] == k;
    flags[p] = (i64)!same_before | ((i64)(same_before || same_after) << 32);
  }
}

// Sorted entry p as the prefix sum of the flags gives it: rank = inclusive prefix sum, so entry p
// belongs to unique row (rank[p] & 0xffffffff) - 1 and, if that row has more than one entry, is
// entry (rank[p] >> 32) - 1 of the multi list.
struct SortedEntry {
  int u;       // its unique row
  int m;       // its place in the multi list (meaningful where `multi`)
  bool first;  // the row's first entry
  bool multi;  // the row has more than one entry
  __device__ __forceinline__ SortedEntry(const i64* rank, i64 p) {
    const i64 r = rank[p], before = p > 0 ? rank[p - 1] : 0;
    u = (int)(r & 0xffffffff) - 1;
    m = (int)(r >> 32) - 1;
    first = (r & 0xffffffff) != (before & 0xffffffff);
    multi = (r >> 32) != (before >> 32);
  }
};

// The unique rows, where each begins, and the multi list. `inverse` may be null (a batch with a
// transpose); the multi list's outputs may be null (a batch no backward will follow).
template <class Key>
__device__ void unique_scatter(const Key* __restrict__ sorted,  // (n,)
                               const Key* __restrict__ order,   // (n,) positions
                               const i64* __restrict__ rank,    // (n,)
                               i64 n,
                               i64* __restrict__ ids,            // (n,) out, first U used
                               i64* __restrict__ inverse,        // (n,) out, or null
                               i64* __restrict__ start,          // (n + 1,) out, first U + 1
                               int* __restrict__ multi_u,        // (n,) out, or null
                               int* __restrict__ multi_index,    // (n,) out, or null
                               int* __restrict__ multi_first) {  // (n,) out, or null
  for (i64 p = ts_global_thread(); p < n; p += ts_thread_count()) {
    const SortedEntry e(rank, p);
    if (inverse != nullptr) inverse[order[p]] = e.u;
    if (e.first) {
      ids[e.u] = (i64)sorted[p];
      start[e.u] = p;
    }
    if (p == n - 1) start[e.u + 1] = n;
    if (multi_u != nullptr && e.multi) {
      multi_u[e.m] = e.u;
      multi_index[e.m] = (int)order[p];
      if (e.first) multi_first[e.u] = e.m;
    }
  }
}

// Each index's place (common.cuh ts_place), from the sorted list once the cache step has placed
// the rows: the entries of a row are consecutive, so the slots and addresses are read in order
// and only the place is written at random (one write per index). One thread per sorted entry.
template <class Key>
__device__ void scatter_places(const Key* __restrict__ order,     // (n,) positions
                               const i64* __restrict__ rank,      // (n,)
                               i64 n,
                               const i64* __restrict__ slots,      // (U,)
                               const i64* __restrict__ addresses,  // (U,)
                               i64* __restrict__ places) {         // (n,) out
  for (i64 p = ts_global_thread(); p < n; p += ts_thread_count()) {
    const SortedEntry e(rank, p);
    const i64 s = slots[e.u];
    places[order[p]] = ts_place(s, s >= 0 ? 0 : addresses[e.u], !e.multi);
  }
}

#define TS_UNIQUE_KERNELS(SUFFIX, KEY)                                                         \
  extern "C" __global__ void unique_flags_##SUFFIX(const KEY* sorted, i64 n, i64* flags) {    \
    unique_flags<KEY>(sorted, n, flags);                                                       \
  }                                                                                            \
  extern "C" __global__ void unique_scatter_##SUFFIX(                                          \
      const KEY* sorted, const KEY* order, const i64* rank, i64 n, i64* ids, i64* inverse,     \
      i64* start, int* multi_u, int* multi_index, int* multi_first) {                          \
    unique_scatter<KEY>(sorted, order, rank, n, ids, inverse, start, multi_u, multi_index,     \
                        multi_first);                                                          \
  }                                                                                            \
  extern "C" __global__ void scatter_places_##SUFFIX(const KEY* order, const i64* rank, i64 n, \
                                                     const i64* slots, const i64* addresses,   \
                                                     i64* places) {                            \
    scatter_places<KEY>(order, rank, n, slots, addresses, places);                             \
  }
TS_UNIQUE_KERNELS(i32, int)
TS_UNIQUE_KERNELS(i64, i64)

// ------------------------------------------------------------------ the dense unique step
// The replay's unique step (ids and counts, no inverse, no transpose) where every id is below
// `num_rows` and num_rows is a small multiple of the batch: each id is counted into a zeroed
// histogram of num_rows entries, then the histogram is read back in order, a tile per block.
// That costs a few passes over num_rows int32 (L2-resident for a few million rows) where the
// sort costs four radix passes over the batch and their launches. Ids outside [0, num_rows)
// are skipped (no write may go out of bounds) and raise `out_of_range` where the caller asks.

#define TS_DENSE_PER_THREAD 16
#define TS_DENSE_TILE (256 * TS_DENSE_PER_THREAD)  // histogram entries per 256-thread block

// hist[id] += occurrences of id. The lanes of a warp holding the same id add them with one
// atomic (hot ids repeat within a warp). *out_of_range = 1 if an id lies outside the histogram.
extern "C" __global__ void dense_count(const i64* __restrict__ ids, i64 n, i64 num_rows,
                                       int* __restrict__ hist,  // (num_rows,) zero on entry
                                       int* __restrict__ out_of_range) {  // (1,) or null
  const int lane = ts_lane();
  for (i64 base = ts_global_warp() * 32; base < n; base += ts_warp_count() * 32) {
    const i64 i = base + lane;
    const i64 id = i < n ? ids[i] : -1;
    const bool valid = id >= 0 && id < num_rows;
    if (i < n && !valid && out_of_range != nullptr) *out_of_range = 1;
    const u32 same = __match_any_sync(TS_FULL_MASK, valid ? id : -1);
    if (valid && lane == __ffs(same) - 1) atomicAdd(&hist[id], __popc(same));
  }
}

// This thread's TS_DENSE_PER_THREAD consecutive histogram entries (zero past num_rows).
__device__ __forceinline__ void ts_dense_entries(const int* hist, i64 num_rows,
                                                 i64 first, int* v) {
  if (first + TS_DENSE_PER_THREAD <= num_rows) {  // whole int4s: `first` is a multiple of 16
    const int4* q = reinterpret_cast<const int4*>(hist + first);
#pragma unroll
    for (int k = 0; k < TS_DENSE_PER_THREAD / 4; k++) {
      const int4 x = q[k];
      v[4 * k] = x.x, v[4 * k + 1] = x.y, v[4 * k + 2] = x.z, v[4 * k + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < TS_DENSE_PER_THREAD; k++)
      v[k] = first + k < num_rows ? hist[first + k] : 0;
  }
}

// Histogram tiles of a 256-thread block: block-stride, every thread of a block the same trips.
#define TS_FOR_TILES(tile, num_rows)                                                \
  for (i64 tile = blockIdx.x; tile * TS_DENSE_TILE < (num_rows); tile += gridDim.x)

// This thread's entries of histogram tile `tile` into `v`; returns how many ids present in the
// tile come before this thread's (the block's exclusive scan), `*total` the tile's count.
__device__ __forceinline__ int ts_dense_tile(const int* hist, i64 num_rows, i64 tile, int* v,
                                             int* total) {
  ts_dense_entries(hist, num_rows, tile * TS_DENSE_TILE + threadIdx.x * TS_DENSE_PER_THREAD, v);
  int present = 0;
#pragma unroll
  for (int k = 0; k < TS_DENSE_PER_THREAD; k++) present += v[k] != 0;
  return ts_block_exclusive_scan(present, total);
}

// tile_counts[b] = the ids present in histogram tile b.
extern "C" __global__ void dense_tile_counts(const int* __restrict__ hist, i64 num_rows,
                                             int* __restrict__ tile_counts) {  // (tiles,) out
  TS_FOR_TILES(tile, num_rows) {
    int v[TS_DENSE_PER_THREAD], total;
    ts_dense_tile(hist, num_rows, tile, v, &total);
    if (threadIdx.x == 0) tile_counts[tile] = total;
  }
}

// The present ids in ascending order with their counts: tile b writes from its exclusive
// offset (tile_ends[b] - tile_counts[b]; tile_ends is the inclusive prefix sum). Each present
// id's entry then holds its position among them instead of its count (for dense_inverse).
extern "C" __global__ void dense_emit(int* hist, i64 num_rows,  // (num_rows,) counts -> positions
                                      const int* __restrict__ tile_counts,  // (tiles,)
                                      const int* __restrict__ tile_ends,    // (tiles,)
                                      i64* __restrict__ uniq,               // (>= U,) out
                                      i64* __restrict__ counts) {           // (>= U,) out
  TS_FOR_TILES(tile, num_rows) {
    int v[TS_DENSE_PER_THREAD], total;
    int at = ts_dense_tile(hist, num_rows, tile, v, &total);
    at += tile_ends[tile] - tile_counts[tile];
    const i64 first = tile * TS_DENSE_TILE + threadIdx.x * TS_DENSE_PER_THREAD;
#pragma unroll
    for (int k = 0; k < TS_DENSE_PER_THREAD; k++)
      if (v[k] != 0) {
        uniq[at] = first + k;
        counts[at] = v[k];
        hist[first + k] = at;  // only this thread reads this entry
        at++;
      }
  }
}

// inverse[i] = the position of ids[i] among the batch's unique ids (dense_emit's positions);
// 0 for an id outside [0, num_rows), which the caller's checks reject before it is used.
extern "C" __global__ void dense_inverse(const i64* __restrict__ ids, i64 n, i64 num_rows,
                                         const int* __restrict__ position,  // (num_rows,)
                                         i64* __restrict__ inverse) {       // (n,) out
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    const i64 id = ids[i];
    inverse[i] = id >= 0 && id < num_rows ? position[id] : 0;
  }
}
