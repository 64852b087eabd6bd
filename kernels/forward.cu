// The forward pass: pooled bags in one launch. Each bag's rows are read where they live (an L1
// slot, or for a conflict miss its L2 address over PCIe), scaled by the per-sample weights,
// summed in fp32 in index order (as torch's embedding_bag) and, for "mean", divided by the
// bag's length. Only the weights are read: L1 keeps them apart from the optimizer state.
//
// Shapes: B bags, n indices, U unique rows, D = dim weights; L2 rows of `width` floats.
#include "common.cuh"

// One warp per bag. The warp first reads 32 entries' row addresses and weights (one per lane),
// then walks them with shuffles, TS_POOL_ROWS rows' loads in flight at a time. A lane owns K
// elements (floats, or float4 with VEC4: dim % 4 == 0) of each chunk of columns. Every L1 row
// is 16-byte aligned then; an L2 row is where its width is a multiple of 4 (L2_VEC4), else (as
// RowWiseAdagrad's 129 floats) it is read as floats.
//
// Three rows in flight within 64 registers (TS_POOL's launch bounds: 32 warps per
// multiprocessor) beat four in 72 (24 warps): the same on uniform ids, 9 % faster on Zipf ids
// on the H100 (bench/RESULTS.md).
#define TS_POOL_ROWS 3
#define TS_POOL_BLOCK 256  // threads per block: interop._BLOCK
#define TS_POOL_MIN_BLOCKS 4  // resident blocks per multiprocessor: at most 64 registers
template <int K, bool VEC4, bool L2_VEC4>
__device__ void pool(const i64* __restrict__ offsets,    // (B + 1,)
                     const i64* __restrict__ places,     // (n,) or null (common.cuh ts_place)
                     const i64* __restrict__ inverse,    // (n,) each index's unique row, or null
                     const float* __restrict__ psw,      // (n,) or null
                     const i64* __restrict__ slots,      // (U,) L1 slot, -1 = conflict miss
                     const i64* __restrict__ addresses,  // (U,) L2 address
                     const float* __restrict__ l1,       // (C, D) weights
                     const float* __restrict__ l2,       // (L2 rows, width), pinned host
                     i64 width, i64 dim, i64 bags, i64 mean,
                     float* __restrict__ out) {          // (B, D)
  const Tiers tiers = {(float*)l1, nullptr, 0, (float*)l2, dim, width};
  const int lane = ts_lane();
  const int per = VEC4 ? (int)(dim >> 2) : (int)dim;
  for (i64 b = ts_global_warp(); b < bags; b += ts_warp_count()) {
    const i64 start = offsets[b], end = offsets[b + 1];
    for (int c0 = 0; c0 < per; c0 += 32 * K) {
      float acc[K][VEC4 ? 4 : 1];
#pragma unroll
      for (int k = 0; k < K; k++)
#pragma unroll
        for (int q = 0; q < (VEC4 ? 4 : 1); q++) acc[k][q] = 0.f;
      for (i64 j0 = start; j0 < end; j0 += 32) {
        const i64 j = j0 + lane;
        const float* row = nullptr;
        float w = 1.f;
        if (j < end) {
          row = ts_index_weights(tiers, places, inverse, slots, addresses, j);
          if (psw != nullptr) w = psw[j];
        }
        const int cnt = (int)min((i64)32, end - j0);
        for (int e0 = 0; e0 < cnt; e0 += TS_POOL_ROWS) {
          const float* r[TS_POOL_ROWS];
          float we[TS_POOL_ROWS];
#pragma unroll
          for (int e = 0; e < TS_POOL_ROWS; e++) {
            r[e] = (const float*)__shfl_sync(TS_FULL_MASK, (u64)row, e0 + e);
            we[e] = __shfl_sync(TS_FULL_MASK, w, e0 + e);
          }
          if (VEC4) {
            float4 v[TS_POOL_ROWS][K];
#pragma unroll
            for (int e = 0; e < TS_POOL_ROWS; e++)
#pragma unroll
              for (int k = 0; k < K; k++) {
                const int c = c0 + lane + 32 * k;
                if (e0 + e < cnt && c < per) {
                  if (L2_VEC4 || ((u64)r[e] & 15) == 0)
                    v[e][k] = ((const float4*)r[e])[c];
                  else  // an L2 row of an odd width
                    v[e][k] = make_float4(r[e][4 * c], r[e][4 * c + 1], r[e][4 * c + 2],
                                          r[e][4 * c + 3]);
                }
              }
#pragma unroll
            for (int e = 0; e < TS_POOL_ROWS; e++)
#pragma unroll
              for (int k = 0; k < K; k++)
                if (e0 + e < cnt) {
                  acc[k][0] = fmaf(we[e], v[e][k].x, acc[k][0]);
                  acc[k][1] = fmaf(we[e], v[e][k].y, acc[k][1]);
                  acc[k][2] = fmaf(we[e], v[e][k].z, acc[k][2]);
                  acc[k][3] = fmaf(we[e], v[e][k].w, acc[k][3]);
                }
          } else {
            float v[TS_POOL_ROWS][K];
#pragma unroll
            for (int e = 0; e < TS_POOL_ROWS; e++)
#pragma unroll
              for (int k = 0; k < K; k++) {
                const int c = c0 + lane + 32 * k;
                if (e0 + e < cnt && c < per) v[e][k] = r[e][c];
              }
#pragma unroll
            for (int e = 0; e < TS_POOL_ROWS; e++)
#pragma unroll
              for (int k = 0; k < K; k++)
                if (e0 + e < cnt) acc[k][0] = fmaf(we[e], v[e][k], acc[k][0]);
          }
        }
      }
      const float len = (float)(end - start);
#pragma unroll
      for (int k = 0; k < K; k++) {
        const int c = c0 + lane + 32 * k;
        if (c >= per) continue;
        if (VEC4) {
          float4 o = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
          if (mean && end > start) {
            o.x /= len; o.y /= len; o.z /= len; o.w /= len;
          }
          ((float4*)(out + b * dim))[c] = o;
        } else {
          float o = acc[k][0];
          if (mean && end > start) o /= len;
          out[b * dim + c] = o;
        }
      }
    }
  }
}

#define TS_POOL(NAME, K, VEC4, L2_VEC4)                                                         \
  extern "C" __global__ void __launch_bounds__(TS_POOL_BLOCK, TS_POOL_MIN_BLOCKS)               \
      NAME(const i64* offsets, const i64* places, const i64* inverse, const float* psw,         \
           const i64* slots, const i64* addresses, const float* l1, const float* l2, i64 width,  \
           i64 dim, i64 bags, i64 mean, float* out) {                                           \
    pool<K, VEC4, L2_VEC4>(offsets, places, inverse, psw, slots, addresses, l1, l2, width, dim,  \
                           bags, mean, out);                                                    \
  }
TS_POOL(forward_vec4, 1, true, true)  // dim and width % 4 == 0: 128 columns per chunk
TS_POOL(forward_vec4_l1, 1, true, false)  // dim % 4 == 0: float4 from L1, floats from L2
TS_POOL(forward_scalar, 4, false, false)  // any layout: 128 columns per chunk
