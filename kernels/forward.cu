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
// What every pooling function reads, as the kernels take it.
struct PoolArgs {
  const i64* __restrict__ offsets;    // (B + 1,)
  const i64* __restrict__ places;     // (n,) or null (common.cuh ts_place)
  const i64* __restrict__ inverse;    // (n,) each index's unique row, or null
  const float* __restrict__ psw;      // (n,) or null
  const i64* __restrict__ slots;      // (U,) L1 slot, -1 = conflict miss
  const i64* __restrict__ addresses;  // (U,) L2 address
  Tiers tiers;                        // L1's (C, D) weights, L2's (L2 rows, width) pinned host
  i64 dim, bags, mean;
  float* __restrict__ out;            // (B, D)
};

// Bag b, by one warp.
template <int K, bool VEC4, bool L2_VEC4>
__device__ void pool_bag(const PoolArgs& a, i64 b) {
  const int lane = ts_lane();
  const i64 dim = a.dim;
  const int per = VEC4 ? (int)(dim >> 2) : (int)dim;
  const i64 start = __ldg(a.offsets + b), end = __ldg(a.offsets + b + 1);
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
        row = ts_index_weights(a.tiers, a.places, a.inverse, a.slots, a.addresses, j);
        if (a.psw != nullptr) w = a.psw[j];
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
        if (a.mean && end > start) {
          o.x /= len; o.y /= len; o.z /= len; o.w /= len;
        }
        ((float4*)(a.out + b * dim))[c] = o;
      } else {
        float o = acc[k][0];
        if (a.mean && end > start) o /= len;
        a.out[b * dim + c] = o;
      }
    }
  }
}

// A row's columns c (float4 with VEC4) as pool_bag reads them.
template <bool VEC4, bool L2_VEC4>
__device__ __forceinline__ float4 ts_pool_load(const float* r, int c) {
  if (!VEC4) return make_float4(r[c], 0.f, 0.f, 0.f);
  if (L2_VEC4 || ((u64)r & 15) == 0) return ((const float4*)r)[c];
  return make_float4(r[4 * c], r[4 * c + 1], r[4 * c + 2], r[4 * c + 3]);  // an L2 row, odd width
}

// Short bags (about one index a bag: a collection's one id per feature and sample). A warp per
// bag waits for each bag's chain of dependent loads (offsets, place, row) in turn; here a warp
// takes a tile of `tile` consecutive bags (at most 32). Its lanes read the tile's offsets, one
// bag each, and where the tile holds at most 32 indices, find all their rows at once, one index
// each. Then groups of S lanes (S: the least power of two that covers a row's columns) pool
// TS_SHORT_BAGS bags each at a time, all their rows' loads in flight together. A tile of more
// indices is pooled bag by bag (pool_bag). The sums are pool_bag's, in index order: the same
// bits.
#define TS_SHORT_BAGS 4
// Its registers: four bags' rows and sums in flight per lane group take up to 120 (16 warps per
// multiprocessor); held to 64, they spilled 272-440 bytes a thread (nvcc --resource-usage).
#define TS_SHORT_MIN_BLOCKS 2
template <int K, bool VEC4, bool L2_VEC4>
__device__ void pool_short(const PoolArgs& a, i64 tile) {
  const int lane = ts_lane();
  const i64 dim = a.dim;
  const int per = VEC4 ? (int)(dim >> 2) : (int)dim;
  int lanes = 32;  // per bag
  while (lanes > 1 && lanes / 2 >= per) lanes /= 2;
  const int groups = 32 / lanes, group = lane / lanes, rank = lane % lanes;
  const i64 tiles = (a.bags + tile - 1) / tile;
  for (i64 t = ts_global_warp(); t < tiles; t += ts_warp_count()) {
    const BagTile tl(a.offsets, a.bags, tile, t);
    const i64 b0 = tl.b0, base = tl.base;
    const int nb = tl.nb;
    if (!tl.fits()) {
      for (int i = 0; i < nb; i++) pool_bag<K, VEC4, L2_VEC4>(a, b0 + i);
      continue;
    }
    const float* row = nullptr;  // lane x: index base + x's row and weight
    float w = 1.f;
    if (lane < tl.last - base) {
      row = ts_index_weights(a.tiers, a.places, a.inverse, a.slots, a.addresses, base + lane);
      if (a.psw != nullptr) w = a.psw[base + lane];
    }
    const int first = (int)(tl.start - base), len = (int)(tl.end - tl.start);  // lane i's bag
    for (int i0 = 0; i0 < nb; i0 += groups * TS_SHORT_BAGS) {
      int bf[TS_SHORT_BAGS], bl[TS_SHORT_BAGS], most = 0;  // this group's bags: first, length
#pragma unroll
      for (int q = 0; q < TS_SHORT_BAGS; q++) {
        const int i = i0 + q * groups + group;
        bf[q] = __shfl_sync(TS_FULL_MASK, first, i & 31);
        bl[q] = __shfl_sync(TS_FULL_MASK, len, i & 31);
        if (i >= nb) bl[q] = 0;
        most = max(most, bl[q]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) most = max(most, __shfl_xor_sync(TS_FULL_MASK, most, o));
      for (int c0 = 0; c0 < per; c0 += lanes) {
        const int c = c0 + rank;
        float4 acc[TS_SHORT_BAGS];
#pragma unroll
        for (int q = 0; q < TS_SHORT_BAGS; q++) acc[q] = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int x = 0; x < most; x++) {
          float4 v[TS_SHORT_BAGS];
          float we[TS_SHORT_BAGS];
#pragma unroll
          for (int q = 0; q < TS_SHORT_BAGS; q++) {
            const int src = (bf[q] + x) & 31;
            const float* r = (const float*)__shfl_sync(TS_FULL_MASK, (u64)row, src);
            we[q] = __shfl_sync(TS_FULL_MASK, w, src);
            if (x < bl[q] && c < per) v[q] = ts_pool_load<VEC4, L2_VEC4>(r, c);
          }
#pragma unroll
          for (int q = 0; q < TS_SHORT_BAGS; q++)
            if (x < bl[q] && c < per) {
              acc[q].x = fmaf(we[q], v[q].x, acc[q].x);
              acc[q].y = fmaf(we[q], v[q].y, acc[q].y);
              acc[q].z = fmaf(we[q], v[q].z, acc[q].z);
              acc[q].w = fmaf(we[q], v[q].w, acc[q].w);
            }
        }
#pragma unroll
        for (int q = 0; q < TS_SHORT_BAGS; q++) {
          const int i = i0 + q * groups + group;
          if (i >= nb || c >= per) continue;
          float4 o = acc[q];
          if (a.mean && bl[q] > 0) {
            const float n = (float)bl[q];
            o.x /= n; o.y /= n; o.z /= n; o.w /= n;
          }
          if (VEC4)
            ((float4*)(a.out + (b0 + i) * dim))[c] = o;
          else
            a.out[(b0 + i) * dim + c] = o.x;
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
    const PoolArgs a = TS_POOL_ARGS;                                                            \
    for (i64 b = ts_global_warp(); b < bags; b += ts_warp_count())                              \
      pool_bag<K, VEC4, L2_VEC4>(a, b);                                                         \
  }                                                                                             \
  /* tile: bags per warp (cuda_bags.bag_tile); a kernel of its own keeps NAME's registers */   \
  extern "C" __global__ void __launch_bounds__(TS_POOL_BLOCK, TS_SHORT_MIN_BLOCKS)              \
      NAME##_short(const i64* offsets, const i64* places, const i64* inverse, const float* psw, \
                   const i64* slots, const i64* addresses, const float* l1, const float* l2,    \
                   i64 width, i64 dim, i64 bags, i64 mean, i64 tile, float* out) {              \
    const PoolArgs a = TS_POOL_ARGS;                                                            \
    pool_short<K, VEC4, L2_VEC4>(a, tile);                                                      \
  }
#define TS_POOL_ARGS                                                                            \
  {offsets, places, inverse, psw, slots, addresses,                                             \
   {(float*)l1, nullptr, 0, (float*)l2, dim, width}, dim, bags, mean, out}
TS_POOL(forward_vec4, 1, true, true)  // dim and width % 4 == 0: 128 columns per chunk
TS_POOL(forward_vec4_l1, 1, true, false)  // dim % 4 == 0: float4 from L1, floats from L2
TS_POOL(forward_scalar, 4, false, false)  // any layout: 128 columns per chunk
