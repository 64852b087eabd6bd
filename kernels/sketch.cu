// The LFU frequency sketch (policy.FrequencySketch) on the device: add, and the
// periodic halving, which also ages the cache's scores through the policy functor.
//
// Shapes: U unique ids, depth x width counters, S x W ways.
#include "common.cuh"
#include "policy.cuh"

// Adds counts[i] accesses of each (unique) id to its `depth` counters, and the batch's total
// to `additions`. One thread per id.
extern "C" __global__ void sketch_add(const i64* __restrict__ ids,     // (U,)
                                      const i64* __restrict__ counts,  // (U,)
                                      i64 n, const int* count,         // ts_items
                                      int* counters,                   // (depth, width)
                                      const i64* salts,                // (depth,)
                                      i64* additions,                  // (1,)
                                      i64 depth, i64 width) {
  const Sketch sketch = {counters, salts, additions, depth, width, 0};
  i64 total = 0;
  n = ts_items(n, count);
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    const int c = (int)counts[i];  // the CPU version adds counts.to(int32)
    for (int d = 0; d < depth; d++) atomicAdd(&counters[sketch.position(ids[i], d)], c);
    total += counts[i];
  }
  ts_block_count(additions, total);
}

// Once `sample_size` additions have accumulated: halves every counter and ages every stored
// score (Policy::age). The decision is read on the device, so the host never waits for it;
// sketch_age_reset, launched next, zeroes `additions`.
template <class Policy>
__device__ void sketch_age(int* __restrict__ counters,  // (depth, width)
                           i64 n_counters, const i64* __restrict__ additions,  // (1,)
                           i64 sample_size, WayState* __restrict__ state,      // (S, W)
                           i64 n_ways) {
  if (*additions < sample_size) return;
  for (i64 i = ts_global_thread(); i < n_counters; i += ts_thread_count()) counters[i] >>= 1;
  if (state != nullptr)
    for (i64 i = ts_global_thread(); i < n_ways; i += ts_thread_count())
      state[i].stamp = Policy::age(state[i].stamp);
}

#define TS_AGE(NAME, POLICY)                                                                   \
  extern "C" __global__ void NAME(int* counters, i64 n_counters, const i64* additions,         \
                                  i64 sample_size, WayState* state, i64 n_ways) {              \
    sketch_age<POLICY>(counters, n_counters, additions, sample_size, state, n_ways);           \
  }
TS_AGE(sketch_age_lru, LruPolicy)
TS_AGE(sketch_age_lfu, LfuPolicy)

extern "C" __global__ void sketch_age_reset(i64* additions,  // (1,)
                                            i64 sample_size, int* aged) {  // (1,) or null
  const bool due = *additions >= sample_size;
  if (due) *additions = 0;
  if (aged != nullptr) *aged = due ? 1 : 0;
}
