// A stable radix sort of a batch's ids with their positions: what torch.sort(ids, stable=True)
// gives for ids in [0, 2**bits), but over the ids' `bits` bits alone and with int32 positions.
// torch.sort always sorts all 32 bits of int32 keys and carries int64 positions; a 10 M-row
// table's ids have 24 bits, so this takes three 8-bit passes of four, each moving 8 bytes an
// entry where torch's moves 12.
//
// Each pass is three launches over tiles of TS_RADIX_TILE consecutive entries:
//   radix_counts    how many entries of each tile have each digit (counts[d * tiles + t + 1]);
//   a prefix sum    (torch.cumsum, the caller's) turns them into where each (digit, tile)
//                   begins in the output: digits in order, tiles in order within a digit;
//   radix_scatter   each entry to its place: its (digit, tile) start, plus the entries of its
//                   tile with the same digit before it.
// Ranks within a tile follow position order (warps over consecutive runs, then rounds, then
// lanes), so every pass is stable and the sort is what an LSD radix sort promises.
//
// The first pass reads the int64 ids themselves (their low 32 bits) and takes each entry's
// position as its value: no conversion and no iota before it. Ids at or above 2**bits, or
// negative (a batch that the caller's checks reject before anything uses it), sort by their
// low bits only: garbage order, but the positions are still a permutation, so every later
// kernel stays in bounds.
//
// A count on the device (`count`, or null) sorts only the first *count entries: a step's row
// moves sort a buffer sized for the batch of which the device alone knows the used part.
//
// Launches: 256-thread blocks (one thread per digit), a block per tile, block-stride. A warp
// reads its run of the tile with every load in flight at once, then ranks it.
#include "common.cuh"

#define TS_RADIX_DIGITS 256
#define TS_RADIX_WARPS 8
#define TS_RADIX_ITEMS 16  // entries per thread and tile
#define TS_RADIX_RUN (32 * TS_RADIX_ITEMS)  // a warp's consecutive entries in a tile
#define TS_RADIX_TILE (TS_RADIX_WARPS * TS_RADIX_RUN)  // 4096 (cuda.py _RADIX_TILE)

__device__ __forceinline__ u32 ts_digit(u32 key, i64 shift) { return (key >> shift) & 0xff; }

// The lanes of the warp whose (valid) entry has digit `d`, this one included: eight ballots,
// one per bit of the digit, a fixed cost whatever the digits (the first version's
// __match_any_sync was part of a scatter 4.5 x slower: bench/RESULTS.md, eleventh session).
__device__ __forceinline__ u32 ts_same_digit(u32 d, bool valid) {
  u32 peers = __ballot_sync(TS_FULL_MASK, valid);
#pragma unroll
  for (int b = 0; b < 8; b++) {
    const bool set = (d >> b) & 1;
    const u32 with_bit = __ballot_sync(TS_FULL_MASK, set);
    peers &= set ? with_bit : ~with_bit;
  }
  return peers;
}

// Entry p of the batch as a warp ranks it: whether it lies before n, its digit at `shift`,
// and the lanes holding the same digit.
struct RadixEntry {
  bool valid;
  u32 digit, peers;
};

__device__ __forceinline__ RadixEntry ts_radix_entry(u32 key, i64 p, i64 n, i64 shift) {
  RadixEntry e;
  e.valid = p < n;
  e.digit = ts_digit(key, shift);
  e.peers = ts_same_digit(e.digit, e.valid);
  return e;
}

// This warp's run of tile t: entry r * 32 + lane of it into key[r] (value[r]: the entry's value
// or, with `values` null, its position), every load issued before any is used. Entries at or
// past n (the last tile may stop short) read as 0.
template <class Key>
__device__ __forceinline__ void ts_load_run(const Key* __restrict__ keys,
                                            const int* __restrict__ values, i64 n, i64 t,
                                            u32* key, int* value) {
  const i64 run = t * TS_RADIX_TILE + (i64)(threadIdx.x >> 5) * TS_RADIX_RUN + ts_lane();
#pragma unroll
  for (int r = 0; r < TS_RADIX_ITEMS; r++) {
    const i64 p = run + r * 32;
    key[r] = p < n ? (u32)keys[p] : 0;
    if (value != nullptr) value[r] = p >= n ? 0 : values == nullptr ? (int)p : values[p];
  }
}

// The entries a pass sorts: the first n, or the first *count where the count is on the device
// (null: n). Entries past it are left out: their tiles count nothing and scatter nothing, so
// a sort of a buffer that a step filled only in part costs what its used part does.
__device__ __forceinline__ i64 ts_radix_length(i64 n, const int* count) {
  return count == nullptr ? n : min(n, (i64)max(*count, 0));
}

// counts[d * tiles + t + 1] = entries of tile t whose digit at `shift` is d, and counts[0] = 0,
// so that an inclusive prefix sum of counts is exclusive per (digit, tile).
template <class Key>
__device__ void radix_counts(const Key* __restrict__ keys, i64 n, const int* __restrict__ count,
                             i64 shift, i64 tiles, int* __restrict__ counts) {
  __shared__ int hist[TS_RADIX_DIGITS];
  const int lane = ts_lane();
  const i64 first = (i64)(threadIdx.x >> 5) * TS_RADIX_RUN + lane;  // in the tile
  n = ts_radix_length(n, count);
  if (blockIdx.x == 0 && threadIdx.x == 0) counts[0] = 0;
  for (i64 t = blockIdx.x; t < tiles; t += gridDim.x) {
    if (t * TS_RADIX_TILE >= n) {  // past the sorted entries: a column of zeros, no loads
      counts[threadIdx.x * tiles + t + 1] = 0;
      continue;
    }
    hist[threadIdx.x] = 0;
    u32 key[TS_RADIX_ITEMS];
    ts_load_run<Key>(keys, nullptr, n, t, key, nullptr);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < TS_RADIX_ITEMS; r++) {  // the lanes of one digit add once
      const RadixEntry e = ts_radix_entry(key[r], t * TS_RADIX_TILE + first + r * 32, n, shift);
      if (e.valid && (e.peers & ((1u << lane) - 1)) == 0)
        atomicAdd(&hist[e.digit], __popc(e.peers));
    }
    __syncthreads();
    counts[threadIdx.x * tiles + t + 1] = hist[threadIdx.x];
    __syncthreads();  // before the next tile clears hist
  }
}

// keys_out/values_out[place] = each entry, `starts[d * tiles + t]` being where tile t's
// entries of digit d begin. `values` null: the first pass, whose values are the positions.
// The tile is put in order in shared memory first, so that the writes to the output come in
// runs of consecutive places (a digit's entries of the tile) instead of one entry at a time.
template <class Key>
__device__ void radix_scatter(const Key* __restrict__ keys, const int* __restrict__ values,
                              i64 n, const int* __restrict__ count, i64 shift, i64 tiles,
                              const int* __restrict__ starts, u32* __restrict__ keys_out,
                              int* __restrict__ values_out) {
  __shared__ int warp_place[TS_RADIX_WARPS][TS_RADIX_DIGITS];  // counts, then tile places
  __shared__ int out_offset[TS_RADIX_DIGITS];  // output place minus tile place, per digit
  __shared__ u32 tile_keys[TS_RADIX_TILE];
  __shared__ int tile_values[TS_RADIX_TILE];
  const int lane = ts_lane(), warp = threadIdx.x >> 5;
  const u32 lanes_before = (1u << lane) - 1;
  const i64 first = (i64)warp * TS_RADIX_RUN + lane;  // this thread's first entry in the tile
  n = ts_radix_length(n, count);
  for (i64 t = blockIdx.x; t * TS_RADIX_TILE < n && t < tiles; t += gridDim.x) {
#pragma unroll
    for (int w = 0; w < TS_RADIX_WARPS; w++) warp_place[w][threadIdx.x] = 0;
    u32 key[TS_RADIX_ITEMS];
    int value[TS_RADIX_ITEMS], rank[TS_RADIX_ITEMS];
    ts_load_run<Key>(keys, values, n, t, key, value);
    __syncthreads();
    // each warp ranks its run, 32 entries at a time, in order: rank = entries of the run with
    // the same digit before this one
#pragma unroll
    for (int r = 0; r < TS_RADIX_ITEMS; r++) {
      const RadixEntry e = ts_radix_entry(key[r], t * TS_RADIX_TILE + first + r * 32, n, shift);
      const int before = e.valid ? warp_place[warp][e.digit] : 0;
      rank[r] = e.valid ? before + __popc(e.peers & lanes_before) : -1;
      __syncwarp();  // every peer has read the count before its first lane adds to it
      if (e.valid && (e.peers & lanes_before) == 0)
        warp_place[warp][e.digit] = before + __popc(e.peers);
      __syncwarp();
    }
    __syncthreads();
    {  // digit threadIdx.x: where its entries begin in the tile's order, warp after warp
      int in_tile = 0;
#pragma unroll
      for (int w = 0; w < TS_RADIX_WARPS; w++) in_tile += warp_place[w][threadIdx.x];
      int total;
      int place = ts_block_exclusive_scan(in_tile, &total);
      out_offset[threadIdx.x] = starts[threadIdx.x * tiles + t] - place;
#pragma unroll
      for (int w = 0; w < TS_RADIX_WARPS; w++) {
        const int c = warp_place[w][threadIdx.x];
        warp_place[w][threadIdx.x] = place;
        place += c;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < TS_RADIX_ITEMS; r++) {
      if (rank[r] < 0) continue;
      const int at = warp_place[warp][ts_digit(key[r], shift)] + rank[r];
      tile_keys[at] = key[r];
      tile_values[at] = value[r];
    }
    __syncthreads();
    const int length = (int)min((i64)TS_RADIX_TILE, n - t * TS_RADIX_TILE);
    for (int q = threadIdx.x; q < length; q += blockDim.x) {
      const u32 k = tile_keys[q];
      const i64 at = (i64)out_offset[ts_digit(k, shift)] + q;
      keys_out[at] = k;
      values_out[at] = tile_values[q];
    }
    __syncthreads();  // before the next tile reuses the shared arrays
  }
}

#define TS_RADIX_KERNELS(SUFFIX, KEY)                                                          \
  extern "C" __global__ void radix_counts_##SUFFIX(const KEY* keys, i64 n, const int* count,  \
                                                   i64 shift, i64 tiles, int* counts) {       \
    radix_counts<KEY>(keys, n, count, shift, tiles, counts);                                   \
  }                                                                                            \
  extern "C" __global__ void radix_scatter_##SUFFIX(const KEY* keys, const int* values, i64 n, \
                                                    const int* count, i64 shift, i64 tiles,    \
                                                    const int* starts, u32* keys_out,          \
                                                    int* values_out) {                         \
    radix_scatter<KEY>(keys, values, n, count, shift, tiles, starts, keys_out, values_out);    \
  }
TS_RADIX_KERNELS(i64, i64)  // the first pass: the batch's ids
TS_RADIX_KERNELS(u32, u32)  // later passes: the keys the pass before wrote
