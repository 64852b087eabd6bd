// Research kernels (bench/exp/pcie_moves.py): what a cache miss path's row moves can reach over
// PCIe when a kernel moves them (zero-copy), by direction and by the order of host addresses.
typedef long long i64;

// dst[dst_rows[r]] = src[src_rows[r]] for r < n, rows of w4 float4 (a thread per float4).
// Either side may be pinned host memory (a read or a write over PCIe); a null row list means
// the identity (a dense staging buffer).
__device__ __forceinline__ void copy_rows(float4* __restrict__ dst, const i64* __restrict__ dst_rows,
                                          const float4* __restrict__ src,
                                          const i64* __restrict__ src_rows, i64 n, i64 w4,
                                          i64 first, i64 step) {
  for (i64 i = first; i < n * w4; i += step) {
    const i64 r = i / w4, c = i % w4;
    const i64 s = src_rows ? src_rows[r] : r, d = dst_rows ? dst_rows[r] : r;
    dst[d * w4 + c] = src[s * w4 + c];
  }
}

extern "C" __global__ void copy_one(float4* dst, const i64* dst_rows, const float4* src,
                                    const i64* src_rows, i64 n, i64 w4) {
  copy_rows(dst, dst_rows, src, src_rows, n, w4, (i64)blockIdx.x * blockDim.x + threadIdx.x,
            (i64)gridDim.x * blockDim.x);
}

// Two copies at once in one launch: even blocks do the first, odd blocks the second.
extern "C" __global__ void copy_two(float4* dst_a, const i64* dst_rows_a, const float4* src_a,
                                    const i64* src_rows_a, float4* dst_b, const i64* dst_rows_b,
                                    const float4* src_b, const i64* src_rows_b, i64 n, i64 w4) {
  const i64 first = (i64)(blockIdx.x >> 1) * blockDim.x + threadIdx.x;
  const i64 step = (i64)(gridDim.x >> 1) * blockDim.x;
  if (blockIdx.x & 1)
    copy_rows(dst_b, dst_rows_b, src_b, src_rows_b, n, w4, first, step);
  else
    copy_rows(dst_a, dst_rows_a, src_a, src_rows_a, n, w4, first, step);
}
