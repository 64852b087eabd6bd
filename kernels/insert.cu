// The second half of a cache step: misses are grouped by set, each touched set chooses its
// victims, the fills are listed in ascending id order, and the rows move: a dirty victim goes
// back to L2, then the missed row comes in from L2 (ascending ids, so ascending host
// addresses: docs/DESIGN.md's lesson on zero-copy reads over PCIe).
//
// Grouping without a sort: probe counted the misses of each set (set_misses) and listed the
// touched sets; reserve_segments gives each touched set a contiguous segment of a buffer,
// scatter_misses drops each miss's position in its set's segment (in any order) and returns
// set_misses to zero for the next step; choose_victims then takes, per set, the misses in
// ascending position (= ascending id) order, so the result is deterministic.
//
// Shapes: U unique ids, S sets, W ways, C = S * W slots, T touched sets, F fills; rows of
// `width` floats, `dim` of them weights.
#include "common.cuh"
#include "policy.cuh"

// Gives each touched set a segment of `k` entries (k = its misses). A warp scans 32 sets and
// takes the room for all of them with one atomic.
extern "C" __global__ void reserve_segments(const int* __restrict__ touched,    // (T,)
                                            const int* __restrict__ n_touched,  // (1,)
                                            const int* __restrict__ set_misses,  // (S,)
                                            int* __restrict__ cursor,  // (1,) zero on entry
                                            int* __restrict__ seg_start,    // (S,) out
                                            int* __restrict__ touched_k,    // (T,) out
                                            int* __restrict__ touched_off) {  // (T,) out
  const int nt = *n_touched;
  const int lane = ts_lane();
  for (i64 base = ts_global_warp() * 32; base < nt; base += ts_warp_count() * 32) {
    const i64 t = base + lane;
    const int set = t < nt ? touched[t] : 0;
    const int k = t < nt ? set_misses[set] : 0;
    const int scan = ts_warp_inclusive_scan(k);
    const int total = __shfl_sync(TS_FULL_MASK, scan, 31);
    int first = 0;
    if (lane == 0) first = atomicAdd(cursor, total);
    first = __shfl_sync(TS_FULL_MASK, first, 0);
    if (t < nt) {
      const int off = first + scan - k;
      seg_start[set] = off;
      touched_k[t] = k;
      touched_off[t] = off;
    }
  }
}

// Puts the position of each miss into its set's segment, counting set_misses back to zero.
extern "C" __global__ void scatter_misses(const i64* __restrict__ ids,     // (U,)
                                          const i64* __restrict__ slots,   // (U,) -1 = miss
                                          i64 n, const int* __restrict__ count,  // ts_items
                                          i64 sets,
                                          int* __restrict__ set_misses,      // (S,)
                                          const int* __restrict__ seg_start, // (S,)
                                          int* __restrict__ segments) {      // (misses,) out
  n = ts_items(n, count);
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    if (slots[i] >= 0) continue;
    const i64 set = ts_set_index(ids[i], sets);
    const int k = atomicSub(&set_misses[set], 1) - 1;
    segments[seg_start[set] + k] = (int)i;
  }
}

// One warp per touched set. The set's evictable ways (unlocked: this step's hits hold a lock
// already) are ranked by key (empty = -1, else the stamp), ties by way index; the r-th miss of
// the set in ascending id order takes the way of rank r. Misses beyond the evictable ways are
// conflict misses (their slot stays -1). Writes the new tag, score, clean bit and one lock,
// and records, by position in the batch, the victim and whether it was dirty. With `hit_mask`
// (lookup.cu probe: a step that holds no locks) the step's hits are its set bits, and the fills
// take no lock.
template <class Policy>
__device__ void choose_victims(const int* __restrict__ touched,      // (T,)
                               const int* __restrict__ n_touched,    // (1,)
                               const int* __restrict__ touched_k,    // (T,)
                               const int* __restrict__ touched_off,  // (T,)
                               const int* __restrict__ segments,     // (misses,)
                               const i64* __restrict__ ids,          // (U,)
                               const i64* __restrict__ score,        // (U,)
                               WayState* __restrict__ state,         // (S, W)
                               unsigned char* __restrict__ digests,  // (S, stride)
                               i64 ways,
                               i64* __restrict__ slots,              // (U,)
                               int* __restrict__ filled,             // (U,) 1 where a fill, zeroed
                               i64* __restrict__ victim_by_pos,      // (U,)
                               unsigned char* __restrict__ victim_dirty_by_pos,  // (U,)
                               i64* __restrict__ counters,           // (N_COUNTERS,)
                               const u64* __restrict__ hit_mask) {   // (S,) or null
  const int lane = ts_lane();
  const int W = (int)ways;
  const int stride = ts_digest_stride(W);
  const i64 NOT_EVICTABLE = 0x7fffffffffffffffLL;
  i64 conflicts = 0, evictions = 0, writebacks = 0;
  const int nt = *n_touched;
  for (i64 t = ts_global_warp(); t < nt; t += ts_warp_count()) {
    const i64 set = touched[t];
    const int k = touched_k[t];
    const int off = touched_off[t];
    const u64 held = hit_mask != nullptr ? hit_mask[set] : 0;  // this step's hits, unlocked
    // this lane's ways: lane and lane + 32
    i64 tag[2], key[2];
    bool ev[2], dty[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int w = lane + 32 * h;
      const i64 slot = set * W + w;
      ev[h] = false;
      key[h] = NOT_EVICTABLE;
      tag[h] = TS_EMPTY;
      dty[h] = false;
      if (w < W) {
        const WayState way = state[slot];
        tag[h] = way.tag;
        dty[h] = way.dirty != 0;
        ev[h] = way.lock == 0 && !((held >> w) & 1);
        if (ev[h]) key[h] = tag[h] == TS_EMPTY ? -1 : way.stamp;
      }
    }
    // rank of each evictable way among the evictable ways: (key, way) ascending
    int rank[2] = {0, 0};
    for (int v = 0; v < W; v++) {
      const i64 kv = __shfl_sync(TS_FULL_MASK, v < 32 ? key[0] : key[1], v & 31);
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int w = lane + 32 * h;
        if (kv < key[h] || (kv == key[h] && v < w)) rank[h]++;
      }
    }
    const int n_free = __popc(__ballot_sync(TS_FULL_MASK, ev[0])) +
                       __popc(__ballot_sync(TS_FULL_MASK, ev[1]));
    const int m = min(k, n_free);
    // the r-th smallest miss position of the segment goes to the way of rank r. A segment of
    // up to 32 * SEG_REGS misses is read once into registers; a longer one (a tiny cache) is
    // re-read from memory each round.
    constexpr int SEG_REGS = 8;
    const bool in_regs = k <= 32 * SEG_REGS;
    int seg[SEG_REGS];
#pragma unroll
    for (int j = 0; j < SEG_REGS; j++) {
      const int at = lane + 32 * j;
      seg[j] = in_regs && at < k ? segments[off + at] : 0x7fffffff;
    }
    int prev = -1;
    for (int r = 0; r < m; r++) {
      int best = 0x7fffffff;
      if (in_regs) {
#pragma unroll
        for (int j = 0; j < SEG_REGS; j++)
          if (seg[j] > prev && seg[j] < best) best = seg[j];
      } else {
        for (int j = lane; j < k; j += 32) {
          const int p = segments[off + j];
          if (p > prev && p < best) best = p;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) best = min(best, __shfl_xor_sync(TS_FULL_MASK, best, o));
#pragma unroll
      for (int h = 0; h < 2; h++) {
        if (ev[h] && rank[h] == r) {
          const i64 slot = set * W + lane + 32 * h;
          const bool was = tag[h] != TS_EMPTY;
          const bool wb = was && dty[h];
          const i64 row = ids[best];
          state[slot].tag = row;
          state[slot].stamp = score[best];
          state[slot].lock = hit_mask == nullptr ? 1 : 0;
          digests[set * stride + lane + 32 * h] = (unsigned char)ts_digest(ts_mix64((u64)row));
          state[slot].dirty = 0;
          slots[best] = slot;
          filled[best] = 1;
          victim_by_pos[best] = tag[h];
          victim_dirty_by_pos[best] = wb ? 1 : 0;
          evictions += was;
          writebacks += wb;
        }
      }
      prev = best;
    }
    if (lane == 0) conflicts += k - m;
  }
  ts_block_count(counters + TS_CONFLICTS, conflicts);
  ts_block_count(counters + TS_EVICTIONS, evictions);
  ts_block_count(counters + TS_WRITEBACKS, writebacks);
}

#define TS_CHOOSE(NAME, POLICY)                                                                 \
  extern "C" __global__ void NAME(const int* touched, const int* n_touched, const int* touched_k, \
                                  const int* touched_off, const int* segments, const i64* ids,   \
                                  const i64* score, WayState* state, unsigned char* digests,     \
                                  i64 ways, i64* slots, int* filled, i64* victim_by_pos,         \
                                  unsigned char* victim_dirty_by_pos, i64* counters,             \
                                  const u64* hit_mask) {                                         \
    choose_victims<POLICY>(touched, n_touched, touched_k, touched_off, segments, ids, score,     \
                           state, digests, ways, slots, filled, victim_by_pos,                   \
                           victim_dirty_by_pos, counters, hit_mask);                             \
  }
TS_CHOOSE(choose_victims_lru, LruPolicy)
TS_CHOOSE(choose_victims_lfu, LfuPolicy)

// Lists the fills in ascending position (= ascending id): `rank` is the inclusive prefix sum
// of `filled`, so fill p sits at rank - 1. The last kernel of a step: it also advances the
// device's step clock (read by the next step's probe).
// Inputs are (U,) by batch position, outputs (U,) of which the first F are used.
extern "C" __global__ void compact_fills(const int* __restrict__ filled,
                                         const int* __restrict__ rank,  // inclusive cumsum
                                         i64 n,
                                         const i64* __restrict__ slots,
                                         const i64* __restrict__ victim_by_pos,
                                         const unsigned char* __restrict__ victim_dirty_by_pos,
                                         i64* __restrict__ fill_index,  // out
                                         i64* __restrict__ fill_slots,  // out
                                         i64* __restrict__ victim_ids,  // out
                                         unsigned char* __restrict__ victim_dirty,  // out
                                         i64* __restrict__ step) {  // (1,)
  if (blockIdx.x == 0 && threadIdx.x == 0) *step += 1;  // nothing else in this launch reads it
  for (i64 i = ts_global_thread(); i < n; i += ts_thread_count()) {
    if (!filled[i]) continue;
    const i64 p = rank[i] - 1;
    fill_index[p] = i;
    fill_slots[p] = slots[i];
    victim_ids[p] = victim_by_pos[i];
    victim_dirty[p] = victim_dirty_by_pos[i];
  }
}

// The keys the writeback order sorts (cuda_rows.victim_order): for each of the first F fills,
// its victim's L1 home (the L2 address it goes back to) where the victim is dirty, else `past`
// (beyond every L2 row: clean victims sort last). The entries past F are left as they are: the
// sort reads the first F alone. One launch in place of the torch masks over the whole buffer.
extern "C" __global__ void victim_keys(const i64* __restrict__ fill_slots,  // (F,)
                                       const unsigned char* __restrict__ victim_dirty,  // (F,)
                                       const int* __restrict__ n_fill,      // (1,) F
                                       const i64* __restrict__ l1_home,     // (C,)
                                       i64 n, i64 past,
                                       i64* __restrict__ keys) {            // (n,) out
  const i64 F = min(n, (i64)*n_fill);
  for (i64 i = ts_global_thread(); i < F; i += ts_thread_count())
    keys[i] = victim_dirty[i] ? l1_home[fill_slots[i]] : past;
}

// One pass of a warp over ROWS whole rows at once, weights and state together, between their L1
// slot (weights at near_w, state at near_s: apart) and their L2 row (far: `per` elements, the
// weights' `split` first): element c = c0 + lane + 32 k - skew[r] (k < K) of row r, where it lies
// in [0, per) and go[r], from L1 to L2 (`to_far`) or back. Every load is in flight before the
// first store, so that a row costs one round trip over PCIe, not one for each part. A row's skew
// (how far its L2 row lies past a 128-byte boundary, in elements) lines the warp's accesses up
// with host memory's 128-byte segments.
template <typename T, int ROWS, int K>
__device__ __forceinline__ void copy_pass(T* const (&near_w)[ROWS], T* const (&near_s)[ROWS],
                                          T* const (&far)[ROWS], const bool (&go)[ROWS],
                                          const int (&skew)[ROWS], bool to_far, int c0,
                                          int split, int per) {
  const int lane = ts_lane();
  T v[ROWS][K];
#pragma unroll
  for (int r = 0; r < ROWS; r++)
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int c = c0 + lane + 32 * k - skew[r];
      if (!go[r] || c < 0 || c >= per) continue;
      v[r][k] = to_far ? (c < split ? near_w[r][c] : near_s[r][c - split]) : far[r][c];
    }
#pragma unroll
  for (int r = 0; r < ROWS; r++)
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int c = c0 + lane + 32 * k - skew[r];
      if (!go[r] || c < 0 || c >= per) continue;
      if (to_far)
        far[r][c] = v[r][k];
      else
        (c < split ? near_w[r][c] : near_s[r][c - split]) = v[r][k];
    }
}

// The table that holds store row `row`: the last k with starts[k] <= row (starts ascending,
// starts[0] = 0; one table: 0 at once).
__device__ __forceinline__ int table_of(const i64* __restrict__ starts, int tables, i64 row) {
  int lo = 0, hi = tables - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// A step's row moves, in two launches (cuda_rows.move_rows): first every dirty victim goes back
// from its slot to its L2 address (`writes_back`), in the order of those addresses (`order`: the
// first F fill positions ascending by their victim's L1 home, clean victims last; null: fill order,
// where no victim was dirty lately and the host skipped the sort: CudaCache.writebacks), then every
// fill comes in from L2 in ascending id order and its slot records its L2 address. A kernel's reads
// and writes of pinned host rows reach about 47 and 44 GB/s over PCIe with the host addresses
// ascending, 19 GB/s in random order (bench/exp/pcie_moves.py, H100); the two directions at once
// did not beat them one after the other in a training step (rows of 516 B, RowWiseAdagrad:
// bench/RESULTS.md). Where L2 keeps a map of the rows ever written (`written`, a byte per row in
// pinned host memory, or null; host.py HostTable), a fill whose row was never written is computed
// from its id instead of crossing PCIe (the L2 address of such a table is the row id), and a
// writeback marks its row written. Its value is hashing.initial_weights' bit for bit, at the row's
// table-local id with its table's seed and scale: a store holds `tables` tables, table k from row
// `table_starts[k]` on (store.RowSeeds: a collection's group holds several). A warp moves ROWS rows
// at once, K elements of type T (float, or float4 when both parts of a row are 16-byte aligned) per
// lane and row per pass. Victims and fills never share an L2 row (a victim is cached and not in the
// batch, a fill is in the batch), and each slot belongs to one fill.
template <int ROWS, int K, typename T>
__device__ void move_rows(const i64* __restrict__ fill_index,   // (F,) positions in the batch
                          const i64* __restrict__ fill_slots,   // (F,)
                          const unsigned char* __restrict__ victim_dirty,  // (F,)
                          const int* __restrict__ n_fill,       // (1,) F
                          const int* __restrict__ order,        // (F,) by victim home, or null
                          bool writes_back,
                          const i64* __restrict__ addresses,    // (U,) L2 address of each id
                          float* __restrict__ l1_weights,       // (C, dim)
                          float* __restrict__ l1_state,         // (common.cuh Tiers)
                          i64 state_pitch,                      // floats a slot
                          i64* __restrict__ l1_home,            // (C,)
                          float* __restrict__ l2,               // (L2 rows, width), pinned host
                          i64 dim, i64 width,
                          unsigned char* __restrict__ written,  // (L2 rows,) pinned host, or null
                          const i64* __restrict__ table_starts,  // (T,) ascending, [0] = 0
                          const i64* __restrict__ table_keys,    // (T,) hashing.seed_key
                          const float* __restrict__ table_scales,  // (T,)
                          int tables, float initial_state) {
  const int lane = ts_lane();
  const i64 F = *n_fill;
  constexpr int FLOATS = (int)(sizeof(T) / sizeof(float));
  const int per = (int)(width / FLOATS), split = (int)(dim / FLOATS);  // elements of a row
  const Tiers tiers = {l1_weights, l1_state, state_pitch, l2, dim, width};
  for (i64 i0 = ts_global_warp() * ROWS; i0 < F; i0 += ts_warp_count() * ROWS) {
    i64 slot[ROWS], home[ROWS];
    bool go[ROWS], fresh[ROWS];
    bool any = false;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      const i64 i = i0 + r;
      i64 f = -1;
      if (writes_back) {  // i: a rank; clean victims and unused entries sort last
        f = i >= F ? -1 : order != nullptr ? order[i] : i;
        if (f >= 0 && (f >= F || !victim_dirty[f])) f = -1;
      } else if (i < F) {  // i: a fill
        f = i;
      }
      slot[r] = f >= 0 ? fill_slots[f] : -1;
      home[r] = f < 0 ? 0 : writes_back ? l1_home[slot[r]] : addresses[fill_index[f]];
      // a never-written row is computed below, not read (one byte over PCIe, not a row)
      fresh[r] = !writes_back && f >= 0 && written != nullptr && written[home[r]] == 0;
      go[r] = f >= 0 && !fresh[r];
      any |= f >= 0;
    }
    if (!any) continue;
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; r++) {
        if (slot[r] < 0) continue;
        if (writes_back && written != nullptr) written[home[r]] = 1;
        if (!writes_back) l1_home[slot[r]] = home[r];  // no other warp reads a fill's slot
      }
    }
    // Row 0 stands in for rows a move skips: never dereferenced
    constexpr int SEGMENT = 128 / (int)sizeof(T);  // elements of a 128-byte segment
    T* near_w[ROWS];  // the slot's weights
    T* near_s[ROWS];  // and its state
    T* far[ROWS];     // its L2 row
    int skew[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      const RowRef near = ts_row(tiers, go[r] ? slot[r] : 0, 0);
      near_w[r] = (T*)near.w;
      near_s[r] = (T*)near.s;
      far[r] = (T*)ts_row(tiers, -1, go[r] ? home[r] : 0).w;
      skew[r] = (int)(((unsigned long long)far[r] / sizeof(T)) % SEGMENT);
    }
    for (int c0 = 0; c0 < per + SEGMENT - 1; c0 += 32 * K)
      copy_pass<T, ROWS, K>(near_w, near_s, far, go, skew, writes_back, c0, split, per);
    if (writes_back) continue;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      if (!fresh[r]) continue;
      const int k = table_of(table_starts, tables, home[r]);
      const u64 key = ts_row_key(home[r] - table_starts[k], table_keys[k]);
      const float scale = table_scales[k];
      const RowRef dst = ts_row(tiers, slot[r], 0);
      for (i64 c = lane; c < width; c += 32)
        dst.at(c, dim) = c < dim ? ts_initial_value(key, (int)c, scale) : initial_state;
    }
  }
}

#define TS_MOVE(NAME, ROWS, K, T)                                                                \
  extern "C" __global__ void NAME(const i64* fill_index, const i64* fill_slots,                  \
                                  const unsigned char* victim_dirty, const int* n_fill,          \
                                  const int* order, i64 writes_back, const i64* addresses,       \
                                  float* l1_weights, float* l1_state, i64 state_pitch,           \
                                  i64* l1_home, float* l2, i64 dim, i64 width,                   \
                                  unsigned char* written, const i64* table_starts,               \
                                  const i64* table_keys, const float* table_scales, i64 tables,  \
                                  float initial_state) {                                         \
    move_rows<ROWS, K, T>(fill_index, fill_slots, victim_dirty, n_fill, order, writes_back != 0, \
                           addresses, l1_weights, l1_state, state_pitch, l1_home, l2, dim,      \
                           width, written, table_starts, table_keys, table_scales, (int)tables, \
                           initial_state);                                                       \
  }
TS_MOVE(move_rows_vec4, 8, 1, float4)
TS_MOVE(move_rows_scalar, 4, 5, float)  // a row of 129 floats at any skew in one pass

