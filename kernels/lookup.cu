// The first half of a cache step (cache.py SetAssociativeCache.lookup): a thread per unique id
// of the batch compares the digests of its set's ways at once (ts_find_way), then the tags of
// the few that match.
// Hits take the policy's score and a lock; misses are counted per set, and each set touched by
// a miss is listed once, for insert.cu. Also the small state kernels: find, release, mark dirty.
//
// Shapes: U unique ids of the batch, S sets, W ways (W <= 64), C = S * W slots.
#include "common.cuh"
#include "policy.cuh"

// Slot of each id, or -1 where it is not cached. Changes nothing.
extern "C" __global__ void find_slots(const i64* __restrict__ ids,  // (U,)
                                      i64 n,
                                      const WayState* __restrict__ state,  // (S, W)
                                      const unsigned char* __restrict__ digests,  // (S, stride)
                                      i64 sets, i64 ways,
                                      i64* __restrict__ slots) {  // (U,) out
  const CacheWays c = ts_cache_ways(state, digests, sets, ways);
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    const Probe p = ts_probe(ids, i, c);
    slots[i] = p.way >= 0 ? p.set * ways + p.way : -1;
  }
}

// The probe of step `*step` (the step number lives on the device, so that a captured CUDA graph
// of the step replays with the clock moving; compact_fills advances it): for a hit, the way
// takes the policy's score and one more lock (a locked way is not evictable, which is how
// "used by this step" is told to insert.cu); slots[i] is the hit's slot or -1. For a miss,
// set_misses[set] counts it and the first miss of a set appends the set to `touched`.
// score[i] is every id's score, for the fills. With `hit_mask` (a step whose rows are used and
// given back before any other step: an inference forward) a hit takes no lock: its way's bit in
// hit_mask[set] keeps this step's fills off it instead, and no release is needed.
// The sketch has already counted this batch (sketch_add), so LFU estimates are final.
// A thread per id.
template <class Policy>
__device__ void probe(const i64* __restrict__ ids,     // (U,) ascending
                      const i64* __restrict__ counts,  // (U,) occurrences in the batch
                      i64 n, const int* __restrict__ count,  // U = ts_items(n, count)
                      WayState* __restrict__ state,          // (S, W)
                      const unsigned char* __restrict__ digests,  // (S, stride)
                      i64 sets, i64 ways, const i64* __restrict__ step, const Sketch sketch,
                      i64* __restrict__ slots,       // (U,) out
                      i64* __restrict__ score,       // (U,) out
                      int* __restrict__ set_misses,  // (S,) zero on entry
                      int* __restrict__ touched,     // (U,) out: sets with a miss
                      int* __restrict__ n_touched,   // (1,) zero on entry
                      i64* __restrict__ counters,    // (N_COUNTERS,)
                      u64* __restrict__ hit_mask) {  // (S,) zero on entry, or null
  i64 requests = 0, unique = 0, hits = 0;
  n = ts_items(n, count);
  const i64 now = *step;
  const CacheWays c = ts_cache_ways(state, digests, sets, ways);
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    const Probe p = ts_probe(ids, i, c);
    const i64 s = Policy::score(now, sketch, p.row);
    score[i] = s;
    requests += counts[i];
    unique += 1;
    if (p.way >= 0) {
      const i64 slot = p.set * ways + p.way;
      // the sector the tag was read from: score and lock cost no other random access
      state[slot].stamp = s;
      if (hit_mask != nullptr)
        atomicOr(&hit_mask[p.set], 1ull << p.way);
      else
        atomicAdd(&state[slot].lock, 1);  // ids are unique: no contention; fire and forget
      slots[i] = slot;
      hits += 1;
    } else {
      slots[i] = -1;
      if (atomicAdd(&set_misses[p.set], 1) == 0) touched[atomicAdd(n_touched, 1)] = (int)p.set;
    }
  }
  ts_block_count(counters + TS_REQUESTS, requests);
  ts_block_count(counters + TS_UNIQUE, unique);
  ts_block_count(counters + TS_HITS, hits);
  ts_block_count(counters + TS_MISSES, unique - hits);
}

#define TS_PROBE(NAME, POLICY)                                                                 \
  extern "C" __global__ void NAME(                                                             \
      const i64* ids, const i64* counts, i64 n, const int* count, WayState* state,             \
      const unsigned char* digests, i64 sets, i64 ways,                                        \
      const i64* step, int* sk_counters,                                                       \
      const i64* sk_salts, i64* sk_additions, i64 sk_depth, i64 sk_width, i64 sk_sample,       \
      i64* slots, i64* score, int* set_misses, int* touched, int* n_touched, i64* counters,    \
      u64* hit_mask) {                                                                         \
    const Sketch sketch = {sk_counters, sk_salts, sk_additions, sk_depth, sk_width, sk_sample};\
    probe<POLICY>(ids, counts, n, count, state, digests, sets, ways, step, sketch,              \
                  slots, score, set_misses, touched, n_touched, counters, hit_mask);           \
  }
TS_PROBE(probe_lru, LruPolicy)
TS_PROBE(probe_lfu, LfuPolicy)

// Unlocks the slots a finished batch held (-1 entries ignored; a batch's slots are distinct).
// A trained batch's backward kernels unlock its rows themselves (backward.cu Rows::done).
extern "C" __global__ void release_slots(const i64* __restrict__ slots,  // (U,)
                                         i64 n, const int* __restrict__ count,  // ts_items
                                         WayState* __restrict__ state) {  // (C,)
  n = ts_items(n, count);
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    const i64 s = slots[i];
    if (s < 0) continue;
    atomicSub(&state[s].lock, 1);
  }
}

// Marks slots as written (-1 entries ignored).
extern "C" __global__ void mark_dirty_slots(const i64* __restrict__ slots,  // (U,)
                                            i64 n, WayState* __restrict__ state) {  // (C,)
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    const i64 s = slots[i];
    if (s >= 0) state[s].dirty = 1;
  }
}
