// For the tests only (tests/cuda_checks.py; not shipped in the wheel): common.cuh's hashing and
// initial values, launched alone so that tests/test_cuda.py can hold them to hashing.py. The
// engine computes them inside its own kernels (insert.cu's fills of never-written rows, the
// probe's sets).
//
// Initial rows of never-written ids (hashing.initial_weights, bit for bit): D weights uniform on
// [-scale, scale) from a counter-based hash of (seed, id, column), then the optimizer state at
// its initial value.
//
// Shapes: n ids, rows of `width` = D + state floats.
#include "common.cuh"

// One warp per row; columns across the lanes.
extern "C" __global__ void initial_rows(const i64* __restrict__ ids,  // (n,)
                                        i64 n, i64 dim, i64 width, i64 seed_key, float scale,
                                        float initial_state,
                                        float* __restrict__ out) {  // (n, width)
  for (i64 i = ts_global_warp(); i < n; i += ts_warp_count()) {
    const u64 key = ts_row_key(ids[i], seed_key);
    float* row = out + i * width;
    for (i64 c = ts_lane(); c < width; c += 32)
      row[c] = c < dim ? ts_initial_value(key, (int)c, scale) : initial_state;
  }
}

// mix64 and set_index of ids, for the tests that hold them to hashing.py.
extern "C" __global__ void hash_ids(const i64* __restrict__ ids,  // (n,)
                                    i64 n, i64 sets,
                                    i64* __restrict__ mixed,    // (n,) out
                                    i64* __restrict__ set_of) {  // (n,) out
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    mixed[i] = (i64)ts_mix64((u64)ids[i]);
    set_of[i] = ts_set_index(ids[i], sets);
  }
}
