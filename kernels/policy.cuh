// Replacement policies as score functors: the template argument that makes one kernel serve
// every policy (tierstore/policy.py). A full set evicts its lowest score, ties by way index;
// a policy only says what score a touched row gets and how scores age when the frequency
// sketch halves. Adding a policy: one struct here, one `extern "C"` line per kernel that takes
// it (lookup.cu, insert.cu, sketch.cu), one class in policy.py that declares the struct and the
// kernels' suffix (`cuda_functor = CudaFunctor("LruPolicy", "lru")`: the backend launches
// probe_lru; tests/test_policy.py checks the two agree).
#pragma once
#include "common.cuh"

// The count-min sketch of policy.FrequencySketch: `depth` rows of `width` int32 counters, a
// row id's counter in sketch row d at reduce_range(mix64(id ^ salt[d]), width).
struct Sketch {
  int* counters;      // (depth, width)
  const i64* salts;   // (depth,)
  i64* additions;     // (1,) additions since the last halving
  i64 depth;
  i64 width;
  i64 sample_size;

  __device__ __forceinline__ i64 position(i64 row, int d) const {
    return d * width + ts_reduce_range(ts_mix64((u64)(row ^ salts[d])), width);
  }

  // The estimate of `row`: the minimum of its counters.
  __device__ __forceinline__ int estimate(i64 row) const {
    int best = 0x7fffffff;
    for (int d = 0; d < depth; d++) best = min(best, counters[position(row, d)]);
    return best;
  }
};

// Least recently used: the score is the step of the last access.
struct LruPolicy {
  static constexpr bool uses_frequency = false;
  __device__ static __forceinline__ i64 score(i64 step, const Sketch&, i64) { return step; }
  __device__ static __forceinline__ i64 age(i64 stamp) { return stamp; }
};

// Least frequently used: the score is the row's frequency estimate; scores halve with the sketch.
struct LfuPolicy {
  static constexpr bool uses_frequency = true;
  __device__ static __forceinline__ i64 score(i64, const Sketch& sketch, i64 row) {
    return (i64)sketch.estimate(row);
  }
  __device__ static __forceinline__ i64 age(i64 stamp) { return stamp >> 1; }
};
