// Benchmark-only kernels (bench/exp/floor.py): the least a training step's
// row traffic can cost on a card. A thread per 16 bytes of a row, nothing else to wait on: the
// row's index is read from a dense list, the row is read (and written back). What a step's
// kernels add to these floors is the cost of their own work (lookups, gradient sums, order).
// Last, the probe's sectors alone (probe_sectors: a thread per unique id, its slot given).
typedef long long i64;

// w - 0.01 g, the update the floor kernels write back.
__device__ __forceinline__ float4 sgd_step(float4 w, float4 g) {
  return make_float4(fmaf(-0.01f, g.x, w.x), fmaf(-0.01f, g.y, w.y), fmaf(-0.01f, g.z, w.z),
                     fmaf(-0.01f, g.w, w.w));
}

// Reads the first `w4` float4 of the rows `ids` (n, in any order) of a table of `pitch4` float4
// per row (w4 for whole rows). The sum is stored only when it equals a value no random table
// gives, so the loads cannot be dropped.
extern "C" __global__ void gather_rows(const float4* __restrict__ table,
                                       const i64* __restrict__ ids, i64 n, i64 w4, i64 pitch4,
                                       float* __restrict__ sink) {
  const i64 step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * w4; i += step) {
    const float4 v = table[ids[i / w4] * pitch4 + i % w4];
    const float s = v.x + v.y + v.z + v.w;
    if (s == 1.2345e30f) sink[0] = s;
  }
}

// Read-modify-write of the rows `ids` (n distinct rows): row -= 0.01 * g, g one of 1 024
// gradient rows (they stay in L2, as a batch's gradient rows would).
extern "C" __global__ void update_rows(float4* __restrict__ table, const i64* __restrict__ ids,
                                      i64 n, i64 w4, const float4* __restrict__ grad) {
  const i64 step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * w4; i += step) {
    const i64 r = i / w4;
    float4* p = table + ids[r] * w4 + i % w4;
    const float4 g = grad[(r & 1023) * w4 + i % w4];
    *p = sgd_step(*p, g);
  }
}

// update_rows, and each row's 32-byte record read and written beside it: where L1 keeps a way's
// state (kernels/common.cuh WayState), which RowWiseAdagrad's one float of state and the dirty
// bit share, so a step's update must touch it too. `records`: 8 floats a row; the row's first
// thread loads the record with the row and stores it after.
extern "C" __global__ void update_rows_with_record(float4* __restrict__ table,
                                                   const i64* __restrict__ ids, i64 n, i64 w4,
                                                   const float4* __restrict__ grad,
                                                   float* __restrict__ records) {
  const i64 step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * w4; i += step) {
    const i64 r = i / w4, id = ids[r];
    const bool first = i % w4 == 0;
    float4* p = table + id * w4 + i % w4;
    const float state = first ? records[id * 8] : 0.f;
    const float4 g = grad[(r & 1023) * w4 + i % w4];
    *p = sgd_step(*p, g);
    if (first) {
      records[id * 8] = state + g.x * g.x;
      records[id * 8 + 1] = 1.f;
    }
  }
}

// The same traffic at RowWiseAdagrad's layout: rows of `pitch` floats (129: 128 weights and the
// row's state, so rows are only 4-byte aligned), a thread per 4 floats of a row, scalar loads.
// Reads the first `cols` floats of the rows `ids` (the forward's: the weights, not the state).
extern "C" __global__ void gather_rows_pitched(const float* __restrict__ table,
                                               const i64* __restrict__ ids, i64 n, i64 cols,
                                               i64 pitch, float* __restrict__ sink) {
  const i64 per = (cols + 3) / 4, step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * per; i += step) {
    const i64 r = i / per, c0 = 4 * (i % per);
    const float* p = table + ids[r] * pitch;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 4; k++)
      if (c0 + k < cols) s += p[c0 + k];
    if (s == 1.2345e30f) sink[0] = s;
  }
}

// Read-modify-write of the whole rows `ids` (n distinct rows of `pitch` floats), as update_rows.
extern "C" __global__ void update_rows_pitched(float* __restrict__ table,
                                               const i64* __restrict__ ids, i64 n, i64 pitch,
                                               const float* __restrict__ grad) {
  const i64 per = (pitch + 3) / 4, step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * per; i += step) {
    const i64 r = i / per, c0 = 4 * (i % per);
    float* p = table + ids[r] * pitch;
    const float* g = grad + (r & 1023) * pitch;
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
      if (c0 + k < pitch) v[k] = p[c0 + k];
#pragma unroll
    for (int k = 0; k < 4; k++)
      if (c0 + k < pitch) p[c0 + k] = fmaf(-0.01f, g[c0 + k], v[k]);
  }
}

// update_rows_with_record's traffic with the record moved into the row: rows of `pitch4` float4
// (34: 136 floats, 32-byte aligned), the weights in the first `w4`, the state in the sector
// after them. The row's first thread loads the state with the row and stores it after.
extern "C" __global__ void update_rows_state_inside(float4* __restrict__ table,
                                                    const i64* __restrict__ ids, i64 n, i64 w4,
                                                    i64 pitch4, const float4* __restrict__ grad) {
  const i64 step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * w4; i += step) {
    const i64 r = i / w4;
    float4* row = table + ids[r] * pitch4;
    const bool first = i % w4 == 0;
    float* state = (float*)(row + w4);
    const float s = first ? *state : 0.f;
    const float4 g = grad[(r & 1023) * w4 + i % w4];
    row[i % w4] = sgd_step(row[i % w4], g);
    if (first) *state = s + g.x * g.x;
  }
}

// The probe's memory traffic for each unique id of a batch (kernels/lookup.cu probe), a thread
// per id, with the slot already known: its set's line of 32 one-byte digests is read, then its
// way's 32-byte record (the tag); the record takes the step's stamp and one more lock. `slots`
// in the batch's order (ids ascending: sets at random) or sorted (sets in order).
extern "C" __global__ void probe_sectors(const i64* __restrict__ slots, i64 n, i64 ways,
                                         const uint4* __restrict__ digests,  // (S, 2)
                                         i64* __restrict__ records,          // (C, 4)
                                         i64* __restrict__ found) {          // (n,) out
  const i64 step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    const i64 slot = slots[i], set = slot / ways;
    const uint4 a = digests[2 * set], b = digests[2 * set + 1];
    const unsigned mixed = a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
    i64* record = records + 4 * slot;
    const i64 tag = record[0];
    record[1] = tag + 1;  // the stamp
    atomicAdd((unsigned long long*)(record + 2), 1ull);  // the lock
    found[i] = slot + (mixed == 0x12345678u);  // keeps the digests' loads
  }
}
