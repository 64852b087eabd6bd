// The backward pass: the gradient of each unique row, summed over the indices that read it in
// index order, then the fused optimizer applied to the row where it lives (an L1 slot, or for a
// conflict miss its L2 address in pinned host memory, updated over PCIe). The group that
// updates an L1 row also marks it dirty and, where the batch holds locks, unlocks it: both in the
// way's record (one sector, common.cuh WayState), so the batch's release leaves L1 alone. A
// release kernel of its own cost one more random pass over the batch's records.
//
// The batch's sparse transpose (kernels/unique.cu) splits its indices in two:
// - A row read by one index only (most rows of a uniform batch) has that index's gradient: such
//   rows are updated by update_singles, bag by bag, so that each bag's gradient row is read
//   once.
// - The other rows' entries, sorted by row and ascending within a row, form the multi list,
//   cut into chunks of G entries, each worked on by a group of G lanes (a template argument;
//   the warp, G = 32, is what is built), so that a row read by 100 000 indices (Zipf) is summed
//   by many groups: a row whose entries lie in one chunk is finished there (summed in index
//   order, exactly as the CPU backend's index_add_); a row that crosses chunks leaves one
//   partial sum per chunk, and sum_groups and finish_crossing add them in chunk order, in two
//   levels. The list's length stays on the device (`count`): a uniform batch's list is a fifth
//   of the batch, and chunks of the whole sorted batch cost a pass over all of it.
// Deterministic either way.
//
// Shapes: B bags, n indices, U unique rows, D = dim, L2 rows of `width` floats, M entries in the
// multi list (M <= n), P = ceil(n / G) chunks at most.
#include "common.cuh"

// The bag of each index. A warp per 32 bags, a lane per bag: a short bag's indices are written
// by its lane, a longer bag's by the whole warp (one warp per bag waited for each bag's offsets
// in turn: a batch of one index a bag took as long as its forward).
#define TS_SHORT_BAG 4  // indices a lane writes alone
extern "C" __global__ void bag_of_index(const i64* __restrict__ offsets,  // (B + 1,)
                                        i64 bags, int* __restrict__ bag) {  // (n,) out
  const int lane = ts_lane();
  for (i64 b0 = ts_global_warp() * 32; b0 < bags; b0 += ts_warp_count() * 32) {
    const i64 b = b0 + lane;
    i64 first = 0, last = 0;
    if (b < bags) first = offsets[b], last = offsets[b + 1];
    const bool alone = last - first <= TS_SHORT_BAG;
    if (alone)
      for (i64 j = first; j < last; j++) bag[j] = (int)b;
    for (unsigned todo = __ballot_sync(TS_FULL_MASK, !alone); todo; todo &= todo - 1) {
      const int src = __ffs(todo) - 1;
      const i64 f = __shfl_sync(TS_FULL_MASK, first, src), l = __shfl_sync(TS_FULL_MASK, last, src);
      for (i64 j = f + lane; j < l; j += 32) bag[j] = (int)(b0 + src);
    }
  }
}

// The gradient of the per-sample weights: dot(grad_out[b] (/ len for mean), row(j)[:D]) for
// each index j of bag b, read before the optimizer changes the rows. One warp per bag, as the
// forward: the lanes first find 32 indices' rows at once (through the batch's places where it
// has them, a training batch's, else through its inverse), then the warp reads TS_DOT_ROWS of
// those rows at a time, their loads in flight together. A warp per index had one row in flight
// and took 1.8 times as long as the forward's reads of the same rows (bench/RESULTS.md).
#define TS_DOT_ROWS 4
extern "C" __global__ void weight_grad(const i64* __restrict__ offsets,    // (B + 1,)
                                       const i64* __restrict__ places,     // (n,) or null
                                       const i64* __restrict__ inverse,    // (n,) or null
                                       const float* __restrict__ grad_out, // (B, D)
                                       const i64* __restrict__ slots,      // (U,)
                                       const i64* __restrict__ addresses,  // (U,)
                                       const float* __restrict__ l1,       // (C, D) weights
                                       const float* __restrict__ l2,       // (L2 rows, width)
                                       i64 width, i64 dim, i64 bags, i64 mean,
                                       float* __restrict__ out) {          // (n,)
  const Tiers tiers = {(float*)l1, nullptr, 0, (float*)l2, dim, width};
  const int lane = ts_lane();
  for (i64 b = ts_global_warp(); b < bags; b += ts_warp_count()) {
    const i64 first = offsets[b], last = offsets[b + 1];
    const float len = (float)(last - first);
    const float* g = grad_out + b * dim;
    for (i64 j0 = first; j0 < last; j0 += 32) {
      const float* row = nullptr;
      if (j0 + lane < last)
        row = ts_index_weights(tiers, places, inverse, slots, addresses, j0 + lane);
      const int cnt = (int)min((i64)32, last - j0);
      for (int e0 = 0; e0 < cnt; e0 += TS_DOT_ROWS) {
        const float* r[TS_DOT_ROWS];
        float acc[TS_DOT_ROWS];
#pragma unroll
        for (int e = 0; e < TS_DOT_ROWS; e++) {  // past the last, the last row again (unused)
          r[e] = (const float*)__shfl_sync(TS_FULL_MASK, (u64)row, min(e0 + e, cnt - 1));
          acc[e] = 0.f;
        }
        // each lane sums its columns in order, then the warp's butterfly: the same sum for a
        // row whichever indices share its turn
#pragma unroll 4
        for (i64 c = lane; c < dim; c += 32) {
          float gc = g[c];
          if (mean) gc = __fdiv_rn(gc, len);
#pragma unroll
          for (int e = 0; e < TS_DOT_ROWS; e++) acc[e] = fmaf(gc, r[e][c], acc[e]);
        }
#pragma unroll
        for (int e = 0; e < TS_DOT_ROWS; e++) {
          const float v = ts_warp_sum(acc[e]);
          if (lane == 0 && e0 + e < cnt) out[j0 + e0 + e] = v;
        }
      }
    }
  }
}

// ------------------------------------------------------------------- lane groups
// G lanes of a warp that work on one row together: lane `rank` of the group owns the columns
// rank + G k. Shuffles and sums stay inside the group (its mask), so the groups of a warp may
// diverge.
template <int G>
struct Group {
  unsigned mask;
  int rank;
  __device__ __forceinline__ Group() {
    const int lane = ts_lane();
    rank = lane & (G - 1);
    mask = G == 32 ? TS_FULL_MASK : (((1u << G) - 1) << (lane & ~(G - 1)));
  }
  __device__ __forceinline__ float sum(float v) const {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, G);
    return v;
  }
  template <class T>
  __device__ __forceinline__ T shfl(T v, int src) const {
    return __shfl_sync(mask, v, src, G);
  }
};

// ---------------------------------------------------------------- the optimizers
// Each is a functor in two halves, so that a row's loads can be in flight while its gradient is
// still being summed: `load` reads what the update needs of the row (weights, state) into a
// RowState, `apply` writes the updated row; g[k] is the summed gradient of column rank + G k
// (0 past dim). Formulas of tierstore/optim.py.

template <int K>
struct RowState {
  float w[K];  // weights of the lane's columns
  float s[K];  // per-weight state (Adagrad) or, in s[0], the row's one state (row-wise)
};

// The weights of a lane's columns.
template <int G, int K>
__device__ __forceinline__ void ts_load_weights(const RowRef& row, RowState<K>& st, int dim,
                                                const Group<G>& grp) {
#pragma unroll
  for (int k = 0; k < K; k++) {
    const int c = grp.rank + G * k;
    if (c < dim) st.w[k] = row.w[c];
  }
}

struct SgdUpdate {  // w -= lr * g
  float lr, eps;
  template <int G, int K>
  __device__ __forceinline__ void load(const RowRef& row, RowState<K>& st, int dim,
                                       const Group<G>& grp) const {
    ts_load_weights<G, K>(row, st, dim, grp);
  }
  template <int G, int K>
  __device__ __forceinline__ void apply(const RowRef& row, const RowState<K>& st,
                                        const float (&g)[K], int dim,
                                        const Group<G>& grp) const {
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int c = grp.rank + G * k;
      if (c < dim) row.w[c] = fmaf(-lr, g[k], st.w[k]);
    }
  }
};

struct AdagradUpdate {  // s += g*g; w -= lr * g / (sqrt(s) + eps); state: one float per weight
  float lr, eps;
  template <int G, int K>
  __device__ __forceinline__ void load(const RowRef& row, RowState<K>& st, int dim,
                                       const Group<G>& grp) const {
    ts_load_weights<G, K>(row, st, dim, grp);
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int c = grp.rank + G * k;
      if (c < dim) st.s[k] = row.s[c];
    }
  }
  template <int G, int K>
  __device__ __forceinline__ void apply(const RowRef& row, const RowState<K>& st,
                                        const float (&g)[K], int dim,
                                        const Group<G>& grp) const {
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int c = grp.rank + G * k;
      if (c >= dim) continue;
      const float s = __fadd_rn(st.s[k], __fmul_rn(g[k], g[k]));
      row.s[c] = s;
      row.w[c] = fmaf(-lr, __fdiv_rn(g[k], __fadd_rn(__fsqrt_rn(s), eps)), st.w[k]);
    }
  }
};

struct RowWiseAdagradUpdate {  // s += mean(g*g); w -= lr * g / (sqrt(s) + eps); state: 1 float
  float lr, eps;
  template <int G, int K>
  __device__ __forceinline__ void load(const RowRef& row, RowState<K>& st, int dim,
                                       const Group<G>& grp) const {
    st.s[0] = row.s[0];
    ts_load_weights<G, K>(row, st, dim, grp);
  }
  template <int G, int K>
  __device__ __forceinline__ void apply(const RowRef& row, const RowState<K>& st,
                                        const float (&g)[K], int dim,
                                        const Group<G>& grp) const {
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < K; k++) sq = __fadd_rn(sq, __fmul_rn(g[k], g[k]));  // g is 0 past dim
    sq = grp.sum(sq);
    const float s = __fadd_rn(st.s[0], __fdiv_rn(sq, (float)dim));
    const float denom = __fadd_rn(__fsqrt_rn(s), eps);
    __syncwarp(grp.mask);  // every lane has read the state before rank 0 stores it
    if (grp.rank == 0) row.s[0] = s;
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int c = grp.rank + G * k;
      if (c < dim) row.w[c] = fmaf(-lr, __fdiv_rn(g[k], denom), st.w[k]);
    }
  }
};

// Everything a group needs to reach and update unique row u.
struct Rows {
  const i64* slots;      // (U,)
  const i64* addresses;  // (U,)
  Tiers tiers;
  WayState* way_state;   // (C,) L1's way records
  int unlock;            // the batch holds locks on its L1 rows: release them as they are done
  int dim;

  __device__ __forceinline__ RowRef row(i64 slot, i64 addr) const {
    return ts_row(tiers, slot, addr);
  }

  // After the update of the row in `slot` (-1: in L2): marks it dirty and releases the batch's
  // lock, one lane for the group. The next step is a later kernel: it sees the row's stores.
  template <int G>
  __device__ __forceinline__ void done(i64 slot, const Group<G>& grp) const {
    if (slot < 0 || grp.rank != 0) return;
    way_state[slot].dirty = 1;
    if (unlock) atomicSub(&way_state[slot].lock, 1);
  }

  // Applies the optimizer to row u (the row read now: no loads to overlap).
  template <int G, int K, class Opt>
  __device__ __forceinline__ void update(i64 u, const float (&g)[K], const Opt& opt,
                                         const Group<G>& grp) const {
    const i64 s = slots[u];
    const RowRef r = row(s, addresses[u]);
    RowState<K> st;
    opt.template load<G, K>(r, st, dim, grp);
    opt.template apply<G, K>(r, st, g, dim, grp);
    done(s, grp);
  }
};

// The singles among a warp's 32 lanes (`todo`: a bit per lane whose index reads a row no
// other index does; `slot`, `addr`, `w`: that lane's row and weight), ROWS at a time, their
// rows' loads (and the gradients' that `grad(lane, used, g)` reads) in flight together. The sum
// of a single's one gradient is reduce_chunks' for a one-entry row: the same bits.
template <int ROWS, int K, class Opt, class Grad>
__device__ __forceinline__ void ts_update_singles(unsigned todo, i64 slot, i64 addr, float w,
                                                  bool weighted, const Grad& grad,
                                                  const Rows& rows, const Opt& opt) {
  const Group<32> grp;
  const int dim = rows.dim;
  while (todo) {
    int e[ROWS];  // the next ROWS singles (lane numbers), -1 past the last
#pragma unroll
    for (int q = 0; q < ROWS; q++) {
      e[q] = todo ? __ffs(todo) - 1 : -1;
      todo &= todo - 1;
    }
    RowRef row[ROWS];
    i64 s[ROWS];
    RowState<K> st[ROWS];
    float g[ROWS][K];
#pragma unroll
    for (int q = 0; q < ROWS; q++) {
      const int src = e[q] < 0 ? e[0] : e[q];
      s[q] = grp.shfl(slot, src);
      row[q] = rows.row(s[q], grp.shfl(addr, src));
      if (e[q] >= 0) opt.template load<32, K>(row[q], st[q], dim, grp);
      grad(src, e[q] >= 0, g[q]);
    }
#pragma unroll
    for (int q = 0; q < ROWS; q++) {
      const float we = grp.shfl(w, e[q] < 0 ? e[0] : e[q]);
      if (e[q] < 0) break;
      float acc[K];
#pragma unroll
      for (int k = 0; k < K; k++) {
        float t = g[q][k];
        if (weighted) t = __fmul_rn(t, we);
        acc[k] = __fadd_rn(0.f, t);
      }
      opt.template apply<32, K>(row[q], st[q], acc, dim, grp);
      rows.done(s[q], grp);
    }
  }
}

// Rows read by one index of the batch (most rows of a uniform batch): their gradient is one
// bag's, so they are updated bag by bag, a warp per bag reading the bag's gradient row once,
// instead of once per index (a 32-index bag re-reads it 32 times from all over the table's
// traffic, and those reads miss L2). Each lane first reads its index's place (common.cuh
// ts_place): whether its row is such a single, and where the row lives, in one coalesced load,
// where the row's bounds and slot, found through its unique position, cost dependent random
// ones. All lanes do so in parallel; then the warp updates the singles a few at a time, their
// rows' loads in flight together. The arithmetic is reduce_chunks' for a one-entry row, so
// results are bit for bit the same as summing it there.
template <int K, class Opt>
__device__ void update_singles_bag(i64 b, const i64* __restrict__ offsets,  // (B + 1,)
                                   const i64* __restrict__ places,  // (n,) common.cuh ts_place
                                   const float* __restrict__ psw,   // (n,) or null
                                   const float* __restrict__ grad_out,  // (B, D)
                                   i64 mean, const Rows& rows, const Opt& opt) {
  // Rows in flight at once. Two (56 registers at K = 4) ran as fast as four (84) on the
  // H200, and 15 % faster with Zipf ids (bench/RESULTS.md).
  constexpr int ROWS = K <= 8 ? 2 : 1;
  const int lane = ts_lane();
  const int dim = rows.dim;
  const i64 first = offsets[b], last = offsets[b + 1];
  if (first == last) return;
  float g[K];
#pragma unroll
  for (int k = 0; k < K; k++) {
    const int c = lane + 32 * k;
    g[k] = c < dim ? grad_out[b * dim + c] : 0.f;
    if (mean) g[k] = __fdiv_rn(g[k], (float)(last - first));
  }
  for (i64 j0 = first; j0 < last; j0 += 32) {
    const i64 j = j0 + lane;
    i64 slot = -1, addr = 0;
    float w = 1.f;
    bool single = false;
    if (j < last) {
      const i64 p = places[j];
      single = ts_place_single(p);
      slot = ts_place_slot(p);
      addr = ts_place_address(p);
      if (single && psw != nullptr) w = psw[j];
    }
    const unsigned todo = __ballot_sync(TS_FULL_MASK, single);
    const auto bag_grad = [&](int, bool, float(&out)[K]) {
#pragma unroll
      for (int k = 0; k < K; k++) out[k] = g[k];
    };
    ts_update_singles<ROWS, K>(todo, slot, addr, w, psw != nullptr, bag_grad, rows, opt);
  }
}

// The same for short bags (about one index a bag), as the forward's pool_short: a warp per tile
// of `tile` consecutive bags (at most 32), whose lanes read the tile's offsets one bag each and,
// where the tile holds at most 32 indices, the places of all of them at once, one index each;
// each index finds its bag among the lanes' by a binary search of shuffles. Then the warp
// updates the singles a few at a time, each with its own bag's gradient row, the rows' and the
// gradients' loads in flight together. A tile of more indices goes bag by bag. The arithmetic
// is update_singles_bag's: the same bits.
template <int K, class Opt>
__device__ void update_singles_short(const i64* __restrict__ offsets, i64 bags, i64 tile,
                                     const i64* __restrict__ places,
                                     const float* __restrict__ psw,
                                     const float* __restrict__ grad_out, i64 mean,
                                     const Rows& rows, const Opt& opt) {
  constexpr int ROWS = K <= 2 ? 4 : K <= 8 ? 2 : 1;  // rows in flight
  const int lane = ts_lane();
  const int dim = rows.dim;
  const i64 tiles = (bags + tile - 1) / tile;
  for (i64 t = ts_global_warp(); t < tiles; t += ts_warp_count()) {
    const BagTile tl(offsets, bags, tile, t);
    const i64 b0 = tl.b0, base = tl.base, last = tl.last, start = tl.start, end = tl.end;
    const int nb = tl.nb;
    if (!tl.fits()) {
      for (int i = 0; i < nb; i++)
        update_singles_bag<K, Opt>(b0 + i, offsets, places, psw, grad_out, mean, rows, opt);
      continue;
    }
    const int rel_end = (int)(end - base), len = (int)(end - start);  // of lane i's bag
    int bag = 0;  // index base + lane's bag in the tile: the first whose end is past it
    for (int lo = 0, hi = nb - 1, step = 0; step < 5; step++) {
      const int mid = (lo + hi) >> 1;
      if (__shfl_sync(TS_FULL_MASK, rel_end, mid) > lane)
        hi = mid;
      else
        lo = min(mid + 1, hi);
      bag = lo;
    }
    i64 slot = -1, addr = 0;
    float w = 1.f;
    bool single = false;
    if (lane < last - base) {
      const i64 p = places[base + lane];
      single = ts_place_single(p);
      slot = ts_place_slot(p);
      addr = ts_place_address(p);
      if (single && psw != nullptr) w = psw[base + lane];
    }
    const unsigned todo = __ballot_sync(TS_FULL_MASK, single);
    const auto own_grad = [&](int src, bool used, float(&out)[K]) {  // its own bag's gradient
      const int bq = __shfl_sync(TS_FULL_MASK, bag, src);
      const int lq = __shfl_sync(TS_FULL_MASK, len, bq);
#pragma unroll
      for (int k = 0; k < K; k++) {
        const int c = lane + 32 * k;
        out[k] = (used && c < dim) ? grad_out[(b0 + bq) * dim + c] : 0.f;
        if (mean) out[k] = __fdiv_rn(out[k], (float)lq);
      }
    };
    ts_update_singles<ROWS, K>(todo, slot, addr, w, psw != nullptr, own_grad, rows, opt);
  }
}

// Phase one for the other rows: a group of G lanes per chunk of G entries of the multi list,
// walked piece by piece (a piece: the chunk's entries of one row). Each lane first reads its
// own entry's row place (slot, L2 address), bag and weight, all in parallel; then for each
// piece the group issues the row's loads (weights, state) and, while they are in flight, the
// gradient rows of the piece's entries, two at a time, summed in index order. A row that is
// all in this chunk is updated here; the piece of a row that crosses into the chunk before or
// after is left as a partial sum in slot 0 / 1 of the chunk.
template <int G, int K, class Opt>
__device__ void reduce_chunks(const int* __restrict__ list_u,      // (M,) row of each entry
                              const int* __restrict__ list_index,  // (M,) index of each entry
                              const int* __restrict__ count,       // M = ts_items(n, count)
                              const int* __restrict__ bag,         // (n,)
                              const i64* __restrict__ offsets,     // (B + 1,)
                              const float* __restrict__ psw,       // (n,) or null
                              const float* __restrict__ grad_out,  // (B, D)
                              i64 n, i64 mean, const Rows rows, const Opt opt,
                              float* __restrict__ partial) {       // (P, 2, D) out
  // Gradient rows loaded at once. Two keeps the K = 4 kernel at 64 registers (32 warps per
  // multiprocessor); four took 72 and ran 20 % slower on the H100 (bench/RESULTS.md).
  constexpr int IN_FLIGHT = K <= 4 ? 2 : 1;
  const Group<G> grp;
  const int dim = rows.dim;
  n = ts_items(n, count);
  const i64 chunks = (n + G - 1) / G;
  const i64 stride = ts_thread_count() / G;
  const int group_base = ts_lane() & ~(G - 1);
  for (i64 ch = ts_global_thread() / G; ch < chunks; ch += stride) {
    const i64 p0 = ch * G;
    const int cnt = (int)min((i64)G, n - p0);
    int u = -1, b = 0;
    float len = 1.f, w = 1.f;
    i64 slot = -1, addr = 0;
    if (grp.rank < cnt) u = list_u[p0 + grp.rank];
    const int before = p0 > 0 ? list_u[p0 - 1] : -1;       // the row of the entry before
    const int after = p0 + cnt < n ? list_u[p0 + cnt] : -1;  // and after the chunk
    if (grp.rank < cnt) {
      const i64 j = list_index[p0 + grp.rank];
      b = bag[j];
      slot = rows.slots[u];
      if (slot < 0) addr = rows.addresses[u];
      if (mean) len = (float)(offsets[b + 1] - offsets[b]);
      if (psw != nullptr) w = psw[j];
    }
    for (int e = 0; e < cnt;) {
      const int uc = grp.shfl(u, e);
      // the piece's entries: the group's lanes holding row uc (contiguous: the list is sorted)
      const unsigned same = (__ballot_sync(grp.mask, u == uc) >> group_base);
      const int end = e + __popc(same >> e);
      const bool from_before = e == 0 && before == uc;
      const bool to_after = end == cnt && after == uc;
      const bool owner = !from_before && !to_after;  // the row is finished in this chunk
      const i64 s = grp.shfl(slot, e);
      const RowRef row = rows.row(s, grp.shfl(addr, e));
      RowState<K> st;
      if (owner) opt.template load<G, K>(row, st, dim, grp);
      float acc[K];
#pragma unroll
      for (int k = 0; k < K; k++) acc[k] = 0.f;
      for (int e0 = e; e0 < end; e0 += IN_FLIGHT) {
        float v[IN_FLIGHT][K];
#pragma unroll
        for (int q = 0; q < IN_FLIGHT; q++) {
          const int bq = grp.shfl(b, (e0 + q) & (G - 1));
#pragma unroll
          for (int k = 0; k < K; k++) {
            const int c = grp.rank + G * k;
            v[q][k] = (e0 + q < end && c < dim) ? grad_out[(i64)bq * dim + c] : 0.f;
          }
        }
#pragma unroll
        for (int q = 0; q < IN_FLIGHT; q++) {
          const float le = grp.shfl(len, (e0 + q) & (G - 1));
          const float we = grp.shfl(w, (e0 + q) & (G - 1));
          if (e0 + q >= end) break;
#pragma unroll
          for (int k = 0; k < K; k++) {
            float t = v[q][k];
            if (mean) t = __fdiv_rn(t, le);
            if (psw != nullptr) t = __fmul_rn(t, we);
            acc[k] = __fadd_rn(acc[k], t);
          }
        }
      }
      if (owner) {
        opt.template apply<G, K>(row, st, acc, dim, grp);
        rows.done(s, grp);
      } else {
        float* dst = partial + (ch * 2 + (from_before ? 0 : 1)) * dim;
#pragma unroll
        for (int k = 0; k < K; k++)
          if (grp.rank + G * k < dim) dst[grp.rank + G * k] = acc[k];
      }
      e = end;
    }
  }
}

// A crossing row has one partial sum in each chunk c_first..c_last: slot 1 of c_first (its
// first piece), slot 0 of the others. They are added in two levels, each in chunk order, so
// that a row read 100 000 times is summed by many warps: groups of 32 partials by one warp each
// (the group's sum replaces its first partial), then the group sums by the row's first chunk.
// Chunks hold `chunk` entries of the multi list (the G of reduce_chunks); a full warp works on
// each here.
__device__ __forceinline__ const float* ts_piece(const float* partial, i64 c, i64 c_first,
                                                 int dim) {
  return partial + (c * 2 + (c == c_first ? 1 : 0)) * dim;
}

// The chunks that hold the first and the last entry of row u: the row begins at list_first[u]
// and has as many entries as in the sorted batch (start).
struct RowChunks {
  i64 first, last;
  __device__ __forceinline__ RowChunks(const int* list_first, const i64* start, int u,
                                       i64 chunk) {
    const i64 f = list_first[u];
    first = f / chunk;
    last = (f + start[u + 1] - start[u] - 1) / chunk;
  }
};

// Level one: the warp of chunk c sums the group of 32 partials that starts at c, for the row
// continuing into c (if c is a group start) and for the row starting in c and crossing out.
template <int K>
__device__ void sum_groups(const int* __restrict__ list_u,      // (M,)
                           const int* __restrict__ list_first,  // (U,)
                           const i64* __restrict__ start,       // (U + 1,)
                           i64 n, const int* __restrict__ count,  // M = ts_items(n, count)
                           i64 chunk, int dim, float* __restrict__ partial) {  // (P, 2, D)
  const int lane = ts_lane();
  n = ts_items(n, count);
  const i64 chunks = (n + chunk - 1) / chunk;
  for (i64 ch = ts_global_warp(); ch < chunks; ch += ts_warp_count()) {
    const i64 p0 = ch * chunk, p1 = min(p0 + chunk, n);
    const int rows_here[2] = {list_u[p0], list_u[p1 - 1]};
    for (int r = 0; r < 2; r++) {
      const int u = rows_here[r];
      if (r == 1 && u == rows_here[0]) break;  // one row fills the chunk: done as r = 0
      const RowChunks span(list_first, start, u, chunk);
      if (span.first == span.last || (ch - span.first) % 32 != 0) continue;  // not a leader
      const i64 c_end = min(ch + 32, span.last + 1);
      float acc[K];
      float* dst = (float*)ts_piece(partial, ch, span.first, dim);
#pragma unroll
      for (int k = 0; k < K; k++) acc[k] = lane + 32 * k < dim ? dst[lane + 32 * k] : 0.f;
#pragma unroll 8
      for (i64 c = ch + 1; c < c_end; c++) {
        const float* src = ts_piece(partial, c, span.first, dim);
#pragma unroll
        for (int k = 0; k < K; k++)
          if (lane + 32 * k < dim) acc[k] = __fadd_rn(acc[k], src[lane + 32 * k]);
      }
#pragma unroll
      for (int k = 0; k < K; k++)
        if (lane + 32 * k < dim) dst[lane + 32 * k] = acc[k];
    }
  }
}

// Level two: the warp of the chunk where a crossing row starts adds the row's group sums in
// order and applies the optimizer.
template <int K, class Opt>
__device__ void finish_crossing(const int* __restrict__ list_u,      // (M,)
                                const int* __restrict__ list_first,  // (U,)
                                const i64* __restrict__ start,       // (U + 1,)
                                i64 n, const int* __restrict__ count,  // M = ts_items(n, count)
                                i64 chunk, const Rows rows, const Opt opt,
                                const float* __restrict__ partial) {  // (P, 2, D)
  const Group<32> grp;
  const int dim = rows.dim;
  n = ts_items(n, count);
  const i64 chunks = (n + chunk - 1) / chunk;
  for (i64 ch = ts_global_warp(); ch < chunks; ch += ts_warp_count()) {
    const i64 p1 = min(ch * chunk + chunk, n);
    const int u = list_u[p1 - 1];  // the only row that can start here and cross out
    const RowChunks span(list_first, start, u, chunk);
    if (span.first != ch || span.last == ch) continue;
    float acc[K];
#pragma unroll
    for (int k = 0; k < K; k++) acc[k] = 0.f;
#pragma unroll 8
    for (i64 c = ch; c <= span.last; c += 32) {
      const float* src = ts_piece(partial, c, span.first, dim);
#pragma unroll
      for (int k = 0; k < K; k++)
        if (grp.rank + 32 * k < dim) acc[k] = __fadd_rn(acc[k], src[grp.rank + 32 * k]);
    }
    rows.update<32, K>(u, acc, opt, grp);
  }
}

// The parameters that reach a batch's rows, in this order in every kernel that updates them.
#define TS_ROWS_PARAMS                                                                          \
  const i64 *slots, const i64 *addresses, float *l1_weights, float *l1_state, i64 state_pitch,  \
      float *l2, WayState *way_state, i64 unlock, i64 width, i64 dim
#define TS_ROWS                                                                                 \
  {slots, addresses, {l1_weights, l1_state, state_pitch, l2, dim, width}, way_state,            \
   (int)unlock, (int)dim}

// hyper: (2,) on the device, the rule's lr then eps, read through a pointer so that a changed
// lr (a scheduler's) reaches the next step with no recompile and a captured graph reads it too.
#define TS_REDUCE(SUFFIX, G, K, OPT)                                                            \
  extern "C" __global__ void reduce_chunks_##SUFFIX##_g##G##_k##K(                              \
      const int* list_u, const int* list_index, const int* count, const int* bag,               \
      const i64* offsets, const float* psw, const float* grad_out, i64 n, i64 mean,             \
      TS_ROWS_PARAMS, const float* hyper, float* partial) {                                     \
    const Rows rows = TS_ROWS;                                                                  \
    const OPT opt = {hyper[0], hyper[1]};  /* lr, eps */                                        \
    reduce_chunks<G, K, OPT>(list_u, list_index, count, bag, offsets, psw, grad_out, n, mean,   \
                             rows, opt, partial);                                               \
  }

#define TS_FINISH(SUFFIX, K, OPT)                                                               \
  extern "C" __global__ void finish_crossing_##SUFFIX##_k##K(                                   \
      const int* list_u, const int* list_first, const i64* start, i64 n, const int* count,      \
      i64 chunk, TS_ROWS_PARAMS, const float* hyper, const float* partial) {                    \
    const Rows rows = TS_ROWS;                                                                  \
    const OPT opt = {hyper[0], hyper[1]};  /* lr, eps */                                        \
    finish_crossing<K, OPT>(list_u, list_first, start, n, count, chunk, rows, opt, partial);    \
  }

// The singles' update has two kernels: a warp per bag, and a warp per tile of short bags
// (update_singles_short; tile from cuda_bags.bag_tile), each with its own registers.
#define TS_SINGLES(SUFFIX, K, OPT)                                                              \
  extern "C" __global__ void update_singles_##SUFFIX##_k##K(                                    \
      const i64* offsets, i64 bags, const i64* places, const float* psw,                        \
      const float* grad_out, i64 mean, TS_ROWS_PARAMS, const float* hyper) {                    \
    const Rows rows = TS_ROWS;                                                                  \
    const OPT opt = {hyper[0], hyper[1]};  /* lr, eps */                                        \
    for (i64 b = ts_global_warp(); b < bags; b += ts_warp_count())                              \
      update_singles_bag<K, OPT>(b, offsets, places, psw, grad_out, mean, rows, opt);          \
  }                                                                                             \
  extern "C" __global__ void update_singles_short_##SUFFIX##_k##K(                              \
      const i64* offsets, i64 bags, i64 tile, const i64* places, const float* psw,              \
      const float* grad_out, i64 mean, TS_ROWS_PARAMS, const float* hyper) {                    \
    const Rows rows = TS_ROWS;                                                                  \
    const OPT opt = {hyper[0], hyper[1]};  /* lr, eps */                                        \
    update_singles_short<K, OPT>(offsets, bags, tile, places, psw, grad_out, mean, rows, opt);  \
  }

#define TS_SUM_GROUPS(K)                                                                        \
  extern "C" __global__ void sum_groups_k##K(const int* list_u, const int* list_first,          \
                                             const i64* start, i64 n, const int* count,         \
                                             i64 chunk, i64 dim, float* partial) {              \
    sum_groups<K>(list_u, list_first, start, n, count, chunk, (int)dim, partial);               \
  }
TS_SUM_GROUPS(1)
TS_SUM_GROUPS(2)
TS_SUM_GROUPS(4)
TS_SUM_GROUPS(8)
TS_SUM_GROUPS(16)

// Kernel names: reduce_chunks_<optimizer>_g<G>_k<K> for rows of up to G K weights,
// finish_crossing_<optimizer>_k<K> for up to 32 K, <optimizer> being the suffix of the functor
// an optimizer declares (optim.py: cuda_functor = CudaFunctor("SgdUpdate", "sgd")). Only
// G = 32 is instantiated: measured on the H100 (bench/RESULTS.md), groups of 8 lanes (four
// rows in flight per warp) were no faster on uniform ids, where the row updates are bound by
// HBM bandwidth, and slower on Zipf ids, where a hot row then leaves four times as many partial
// sums.
#define TS_BACKWARD_ALL(NAME, OPT) \
  TS_REDUCE(NAME, 32, 1, OPT)       \
  TS_REDUCE(NAME, 32, 2, OPT)       \
  TS_REDUCE(NAME, 32, 4, OPT)       \
  TS_REDUCE(NAME, 32, 8, OPT)       \
  TS_REDUCE(NAME, 32, 16, OPT)      \
  TS_FINISH(NAME, 1, OPT)           \
  TS_FINISH(NAME, 2, OPT)           \
  TS_FINISH(NAME, 4, OPT)           \
  TS_FINISH(NAME, 8, OPT)           \
  TS_FINISH(NAME, 16, OPT)          \
  TS_SINGLES(NAME, 1, OPT)          \
  TS_SINGLES(NAME, 2, OPT)          \
  TS_SINGLES(NAME, 4, OPT)          \
  TS_SINGLES(NAME, 8, OPT)          \
  TS_SINGLES(NAME, 16, OPT)

TS_BACKWARD_ALL(sgd, SgdUpdate)
TS_BACKWARD_ALL(adagrad, AdagradUpdate)
TS_BACKWARD_ALL(rowwise_adagrad, RowWiseAdagradUpdate)
