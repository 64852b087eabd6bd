// Whole rows of a batch read from, or written to, where they live: the L1 slot, or for a
// conflict miss the L2 address (pinned host memory, over PCIe). The backend's gather/scatter.
//
// Shapes: U unique rows, rows of `width` floats (L1 keeps the first `dim`, the weights, apart
// from the rest: common.cuh Tiers), `cols` <= width of them copied.
#include "common.cuh"

// out[i, :cols] = row of unique i. One warp per row.
extern "C" __global__ void gather_rows(const i64* __restrict__ slots,      // (U,)
                                       const i64* __restrict__ addresses,  // (U,)
                                       i64 n, const float* __restrict__ l1_weights,  // (C, D)
                                       const float* __restrict__ l1_state,  // (Tiers)
                                       i64 state_pitch,                     // floats a slot
                                       const float* __restrict__ l2,        // (L2 rows, width)
                                       i64 dim, i64 width, i64 cols,
                                       float* __restrict__ out) {  // (U, cols)
  const Tiers tiers = {(float*)l1_weights, (float*)l1_state, state_pitch, (float*)l2, dim, width};
  for (i64 i = ts_global_warp(); i < n; i += ts_warp_count()) {
    const RowRef row = ts_row(tiers, slots[i], addresses[i]);
    for (i64 c = ts_lane(); c < cols; c += 32) out[i * cols + c] = row.at(c, dim);
  }
}

// Row of unique i = rows[i]; a row in L1 becomes dirty. One warp per row.
extern "C" __global__ void scatter_rows(const i64* __restrict__ slots,      // (U,)
                                        const i64* __restrict__ addresses,  // (U,)
                                        i64 n, float* __restrict__ l1_weights,  // (C, D)
                                        float* __restrict__ l1_state,  // (Tiers)
                                        i64 state_pitch,               // floats a slot
                                        float* __restrict__ l2,        // (L2 rows, width)
                                        WayState* __restrict__ state,  // (C,)
                                        i64 dim, i64 width,
                                        const float* __restrict__ rows) {  // (U, width)
  const Tiers tiers = {l1_weights, l1_state, state_pitch, l2, dim, width};
  for (i64 i = ts_global_warp(); i < n; i += ts_warp_count()) {
    const i64 s = slots[i];
    const RowRef row = ts_row(tiers, s, addresses[i]);
    for (i64 c = ts_lane(); c < width; c += 32) row.at(c, dim) = rows[i * width + c];
    if (s >= 0 && ts_lane() == 0) state[s].dirty = 1;
  }
}

// After a batch's optimizer step: a conflict miss of the batch (updated in L2) may have been
// filled into L1 since by a prefetched batch, from the L2 row as it was then; copy the updated
// L2 row over that L1 copy (clean: it equals L2 again). A warp per 32 ids: a thread probes
// each conflict miss, the warp copies the rows; groups with no conflict miss cost one read of
// their slots.
extern "C" __global__ void refresh_conflict_rows(const i64* __restrict__ ids,        // (U,)
                                                 const i64* __restrict__ slots,      // (U,)
                                                 const i64* __restrict__ addresses,  // (U,)
                                                 i64 n, const int* __restrict__ count,  // ts_items
                                                 const WayState* __restrict__ state,  // (S, W)
                                                 const unsigned char* __restrict__ digests,
                                                 i64 sets, i64 ways,  // digests: (S, stride)
                                                 float* __restrict__ l1_weights,  // (C, D)
                                                 float* __restrict__ l1_state,  // (Tiers)
                                                 i64 state_pitch,               // floats a slot
                                                 const float* __restrict__ l2,  // (L2 rows, width)
                                                 i64 dim, i64 width) {
  const int lane = ts_lane();
  const Tiers tiers = {l1_weights, l1_state, state_pitch, (float*)l2, dim, width};
  n = ts_items(n, count);
  const CacheWays cache = ts_cache_ways(state, digests, sets, ways);
  for (i64 base = ts_global_warp() * 32; base < n; base += ts_warp_count() * 32) {
    const i64 i = base + lane;
    const bool conflict = i < n && slots[i] < 0;
    if (!__any_sync(TS_FULL_MASK, conflict)) continue;
    i64 now = -1;  // the conflict miss's slot in L1 now, if a later batch filled it
    if (conflict) {
      const Probe p = ts_probe(ids, i, cache);
      if (p.way >= 0) now = p.set * ways + p.way;
    }
    const i64 addr = conflict ? addresses[i] : 0;
    u32 todo = __ballot_sync(TS_FULL_MASK, conflict && now >= 0);
    while (todo) {
      const int e = __ffs(todo) - 1;
      todo &= todo - 1;
      const i64 slot = __shfl_sync(TS_FULL_MASK, now, e);
      const i64 src = __shfl_sync(TS_FULL_MASK, addr, e);
      const RowRef dst = ts_row(tiers, slot, -1);
      for (i64 c = lane; c < width; c += 32) dst.at(c, dim) = l2[src * width + c];
    }
  }
}

// Marks the rows that a batch updated in L2 (its conflict misses: slot -1) as written in L2's
// map of written rows (insert.cu move_rows: a never-written row is computed, not read).
extern "C" __global__ void mark_written(const i64* __restrict__ slots,      // (U,)
                                        const i64* __restrict__ addresses,  // (U,)
                                        i64 n, const int* __restrict__ count,  // ts_items
                                        unsigned char* __restrict__ written) {  // (L2 rows,)
  n = ts_items(n, count);
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count())
    if (slots[i] < 0) written[addresses[i]] = 1;
}
