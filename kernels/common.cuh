// Shared device code of the tierstore kernels: integer types, the hashing of
// tierstore/hashing.py bit for bit, warp helpers and the row copy loop.
//
// NVRTC-compilable: no host headers. Every kernel file includes this one.
#pragma once

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;

#define TS_EMPTY ((i64)0x8000000000000000ULL)  // tag of an empty way (cache.py EMPTY)
#define TS_FULL_MASK 0xffffffffu

// Counter indices of the device-side stats vector (tierstore/stats.py).
#define TS_REQUESTS 0
#define TS_UNIQUE 1
#define TS_HITS 2
#define TS_MISSES 3
#define TS_CONFLICTS 4
#define TS_EVICTIONS 5
#define TS_WRITEBACKS 6

// splitmix64's finalizer (hashing.mix64): unsigned arithmetic gives the logical shifts and
// wrapping multiplies that the torch version emulates on int64.
__device__ __forceinline__ u64 ts_mix64(u64 x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// hashing.reduce_range: multiply-shift of the hash's high 32 bits onto [0, n), n < 2**31.
__device__ __forceinline__ i64 ts_reduce_range(u64 h, i64 n) {
  return (i64)(((h >> 32) * (u64)n) >> 32);
}

// hashing.set_index: the cache set of a row id.
__device__ __forceinline__ i64 ts_set_index(i64 row, i64 sets) {
  return ts_reduce_range(ts_mix64((u64)row), sets);
}

// hashing.initial_weights, element (row, col): the top 24 bits of a counter-based hash mapped
// to [-1, 1) exactly in float32, then one rounding multiply by the scale.
__device__ __forceinline__ float ts_initial_value(u64 row_key, int col, float scale) {
  const u64 golden = 0x9e3779b97f4a7c15ULL;
  u64 u = ts_mix64(row_key + (u64)(col + 1) * golden) >> 40;
  float unit = (float)u * 1.1920928955078125e-07f - 1.0f;  // u * 2**-23 - 1, exact
  return unit * scale;
}

// The per-row key of initial_weights: mix64(row ^ seed_key).
__device__ __forceinline__ u64 ts_row_key(i64 row, i64 seed_key) {
  return ts_mix64((u64)row ^ (u64)seed_key);
}

// Grid-stride loops: `for (i64 i = ts_global_thread(); i < n; i += ts_thread_count())`.
__device__ __forceinline__ i64 ts_global_thread() {
  return (i64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ i64 ts_thread_count() { return (i64)gridDim.x * blockDim.x; }

__device__ __forceinline__ i64 ts_global_warp() { return ts_global_thread() >> 5; }

__device__ __forceinline__ i64 ts_warp_count() { return ts_thread_count() >> 5; }

__device__ __forceinline__ int ts_lane() { return threadIdx.x & 31; }

// The items a launch works on: `n`, the length of its buffers, or in a sync-free step (the
// host never read the batch's unique count) the count the device holds, at most `n`.
__device__ __forceinline__ i64 ts_items(i64 n, const int* count) {
  return count != nullptr ? min(n, (i64)*count) : n;
}

__device__ __forceinline__ float ts_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ int ts_warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, o);
  return v;
}

// Adds a warp's total to a device counter with one atomic (lane 0).
__device__ __forceinline__ void ts_count(i64* counter, int v) {
  int total = ts_warp_sum_int(v);
  if (ts_lane() == 0 && total != 0) atomicAdd((u64*)counter, (u64)(i64)total);
}

// Where the rows are. L2 (pinned host memory, read over PCIe) keeps a row whole: `width`
// floats, its `dim` weights then its optimizer state. L1 keeps the two apart, as FBGEMM keeps
// its momentum: weights (C, dim), and the state of slot s at l1_state + s * state_pitch, so
// that a row of 128 weights is four whole 128-byte lines. RowWiseAdagrad's 129-float rows, kept
// whole, straddled five lines and cost every pass over them a third more (bench/RESULTS.md). Its
// one float of state lives in the way's record (WayState::state, pitch 8 floats), in the sector
// that the update reads anyway to mark the row dirty and unlock it; a wider state is an array.
struct Tiers {
  float* l1_weights;  // (C, dim)
  float* l1_state;    // slot s: width - dim floats at l1_state + s * state_pitch
  i64 state_pitch;
  float* l2;          // (L2 rows, width)
  i64 dim;
  i64 width;
};

// One row's weights and state, wherever it lives.
struct RowRef {
  float* w;  // dim floats
  float* s;  // width - dim floats
  // Element c of the whole row (weights, then state).
  __device__ __forceinline__ float& at(i64 c, i64 dim) const { return c < dim ? w[c] : s[c - dim]; }
};

// A row in the tier that holds it: its L1 slot when >= 0, else its L2 address.
__device__ __forceinline__ RowRef ts_row(const Tiers& t, i64 slot, i64 addr) {
  if (slot >= 0) return {t.l1_weights + slot * t.dim, t.l1_state + slot * t.state_pitch};
  float* row = t.l2 + addr * t.width;
  return {row, row + t.dim};
}

// A batch index's place (unique.cu scatter_places): where its row lives, and whether the index
// is the row's only reader, in one int64, so that a training batch's forward and backward reach
// the row with one coalesced load where its unique position, then the row's slot and its count
// cost dependent random ones. The place is 2 * where + single, `where` being the row's L1 slot
// when >= 0, else the bitwise complement of its L2 address (a conflict miss).
__device__ __forceinline__ i64 ts_place(i64 slot, i64 addr, bool single) {
  return (slot >= 0 ? slot : ~addr) * 2 + (single ? 1 : 0);
}
__device__ __forceinline__ i64 ts_place_slot(i64 place) {  // -1 for a conflict miss
  return place >= 0 ? place >> 1 : -1;
}
__device__ __forceinline__ i64 ts_place_address(i64 place) { return ~(place >> 1); }  // if slot < 0
__device__ __forceinline__ bool ts_place_single(i64 place) { return (place & 1) != 0; }

// The weights of a row in the tier that holds it.
__device__ __forceinline__ const float* ts_weights(const Tiers& t, i64 slot, i64 addr) {
  return slot >= 0 ? t.l1_weights + slot * t.dim : t.l2 + addr * t.width;
}

// The weights that batch index j reads: through its place where the batch has places (a
// training batch's: one load), else through its unique row, then the row's slot and address.
__device__ __forceinline__ const float* ts_index_weights(const Tiers& t, const i64* places,
                                                         const i64* inverse, const i64* slots,
                                                         const i64* addresses, i64 j) {
  if (places != nullptr) {
    const i64 p = places[j];
    return ts_weights(t, ts_place_slot(p), ts_place_address(p));
  }
  const i64 u = inverse[j];
  const i64 s = slots[u];
  return ts_weights(t, s, s >= 0 ? 0 : addresses[u]);
}

// A warp's tile of `tile` (at most 32) consecutive bags from b0 (the short-bag kernels:
// forward.cu pool_short, backward.cu update_singles_short): lane i holds bag b0 + i's bounds
// (lanes past the tile: empty at its end). `fits`: its indices, from `base` on, fit one per lane.
struct BagTile {
  i64 b0, base, last;  // the tile's first bag, first index, and end
  i64 start, end;      // this lane's bag's
  int nb;              // bags in the tile
  __device__ __forceinline__ BagTile(const i64* __restrict__ offsets, i64 bags, i64 tile,
                                     i64 t) {
    const int lane = ts_lane();
    b0 = t * tile;
    nb = (int)min(tile, bags - b0);
    last = offsets[b0 + nb];  // every lane: one broadcast load
    start = lane < nb ? offsets[b0 + lane] : last;
    base = __shfl_sync(TS_FULL_MASK, start, 0);
    end = __shfl_down_sync(TS_FULL_MASK, start, 1);
    if (lane >= nb - 1) end = last;
  }
  __device__ __forceinline__ bool fits() const { return last - base <= 32; }
};

// Inclusive prefix sum of `v` over the warp's lanes (every lane must call it).
__device__ __forceinline__ int ts_warp_inclusive_scan(int v) {
  const int lane = ts_lane();
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(TS_FULL_MASK, v, o);
    if (lane >= o) v += up;
  }
  return v;
}

__device__ __forceinline__ i64 ts_warp_sum_i64(i64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, o);
  return v;
}

// Adds the block's total of `v` to `*counter` with one atomic. Every thread of the block must
// call it (it synchronises the block); a grid-stride kernel calls it once, after its loop, so
// that a step costs a few thousand atomics on the counters, not one per id.
__device__ __forceinline__ void ts_block_count(i64* counter, i64 v) {
  __shared__ i64 partial[32];
  v = ts_warp_sum_i64(v);
  __syncthreads();  // partial may still be read by a previous call
  if (ts_lane() == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    i64 t = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0;
    t = ts_warp_sum_i64(t);
    if (threadIdx.x == 0 && t != 0) atomicAdd((u64*)counter, (u64)t);
  }
}

// hashing.tag_digest: a byte of a row's hash that the set index does not use (the set comes
// from the high 32 bits). The cache keeps it per way beside the tags.
__device__ __forceinline__ int ts_digest(u64 mixed) { return (int)(mixed & 0xff); }

// A way of the CUDA cache: its tag, score, lock and dirty bit in one 32-byte record, one memory
// sector (cuda.py CudaCache.way_state; cache.py's tags, stamps, locks and dirty bits are views of
// it). A hit reads the tag and writes the score and the lock in that one sector: as three arrays
// it touched three random sectors, and the probe is bound by random sectors. The dirty bit is
// there so that the backward marks an updated row dirty in the sector where it unlocks it, where
// a byte array of its own cost a random sector per row more; the row's optimizer state, where it
// is one float (RowWiseAdagrad: Tiers), for the same reason (bench/RESULTS.md).
struct __align__(32) WayState {
  i64 tag;              // the row held, TS_EMPTY when none
  i64 stamp;            // the policy's score: lowest is evicted first
  int lock;             // batches in flight that still need the row: never evicted while > 0
  unsigned char dirty;  // written since it was filled (byte 20: cuda.py's view of it)
  unsigned char unused0[3];
  float state;          // the row's one float of optimizer state, if it has one (byte 24)
  int unused1;
};
static_assert(sizeof(WayState) == 32, "a way's state is one 32-byte sector");

// A cache's ways and their digests. Each set's digests take `stride` bytes (ways rounded up to
// 16, so that a set's digests are whole 16-byte vectors; the padding never matches).
struct CacheWays {
  const WayState* __restrict__ state;         // (S, W)
  const unsigned char* __restrict__ digests;  // (S, stride)
  i64 sets;
  int ways;
  int stride;
};

// Bytes of a set's digests: its ways rounded up to 16 (cuda.py CudaCache.digests).
__device__ __forceinline__ int ts_digest_stride(int ways) { return (ways + 15) & ~15; }

__device__ __forceinline__ CacheWays ts_cache_ways(const WayState* state,
                                                   const unsigned char* digests, i64 sets,
                                                   i64 ways) {
  return {state, digests, sets, (int)ways, ts_digest_stride((int)ways)};
}

// Bit w set where byte w of the 16-byte vector `v` equals `d` (d repeated in each byte).
__device__ __forceinline__ u32 ts_digest_matches(const uint4 v, u32 d) {
  // __vcmpeq4 gives 0xff per equal byte; the multiply gathers one bit per byte into the top
  // nibble (the four partial products land on distinct bits: no carries)
  const u32 m[4] = {__vcmpeq4(v.x, d), __vcmpeq4(v.y, d), __vcmpeq4(v.z, d), __vcmpeq4(v.w, d)};
  u32 bits = 0;
#pragma unroll
  for (int j = 0; j < 4; j++) bits |= (((m[j] & 0x01010101u) * 0x01020408u) >> 24) << (4 * j);
  return bits;
}

// The way of `row` in its set, or -1 where it is not cached: one thread per id. The set's
// digests are read as 16-byte vectors (one 32-byte sector for 32 ways) and compared at once;
// only the ways whose digest matches read their 8-byte tag (about 1.1 for a hit, 0.12 for a
// miss in 32 ways). Every id of a warp is resolved in two dependent memory reads, where
// comparing whole tags took one 256-byte read per set and a warp's 32 sets went a few at a
// time: the probe is bound by memory latency, not bytes.
__device__ __forceinline__ int ts_find_way(const CacheWays c, i64 row, i64 set, int digest) {
  const uint4* d = reinterpret_cast<const uint4*>(c.digests + set * c.stride);
  const u32 pattern = (u32)digest * 0x01010101u;
  u64 match = 0;
#pragma unroll
  for (int q = 0; q < 4; q++)
    if (16 * q < c.stride) match |= (u64)ts_digest_matches(d[q], pattern) << (16 * q);
  if (c.ways < 64) match &= (1ull << c.ways) - 1;  // the padding
  const WayState* way = c.state + set * c.ways;
  while (match) {
    const int w = __ffsll(match) - 1;
    if (way[w].tag == row) return w;  // EMPTY is not a valid row id: an empty way never matches
    match &= match - 1;
  }
  return -1;
}

// A batch's id `i` resolved: its set and its way (-1: not cached).
struct Probe {
  i64 row;
  i64 set;
  int way;
};

__device__ __forceinline__ Probe ts_probe(const i64* __restrict__ ids, i64 i, const CacheWays c) {
  Probe p;
  p.row = ids[i];
  const u64 mixed = ts_mix64((u64)p.row);
  p.set = ts_reduce_range(mixed, c.sets);
  p.way = ts_find_way(c, p.row, p.set, ts_digest(mixed));
  return p;
}

// Exclusive prefix sum of `v` over a 256-thread block; `*total` gets the block's sum.
__device__ __forceinline__ int ts_block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[8];
  const int lane = ts_lane(), warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by the previous call
  const int scan = ts_warp_inclusive_scan(v);
  if (lane == 31) warp_sums[warp] = scan;
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < 8; w++) {
    before += w < warp ? warp_sums[w] : 0;
    all += warp_sums[w];
  }
  *total = all;
  return before + scan - v;
}
