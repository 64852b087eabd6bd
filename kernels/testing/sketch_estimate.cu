// For the tests only (tests/cuda_checks.py; not shipped in the wheel): the sketch's estimates
// (policy.cuh Sketch::estimate, which the LFU probe reads) launched alone, so that
// tests/test_cuda.py can hold them to policy.FrequencySketch.estimate.
//
// Shapes: U unique ids, depth x width counters.
#include "common.cuh"
#include "policy.cuh"

// Current estimates of `ids` (no change). One thread per id.
extern "C" __global__ void sketch_estimate(const i64* __restrict__ ids,  // (U,)
                                           i64 n, int* counters,         // (depth, width)
                                           const i64* salts,             // (depth,)
                                           i64 depth, i64 width,
                                           int* __restrict__ out) {      // (U,)
  const Sketch sketch = {counters, salts, nullptr, depth, width, 0};
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count())
    out[i] = sketch.estimate(ids[i]);
}
