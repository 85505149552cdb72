// Class-balanced crop scoring: histogram of every candidate window, method §6.3 score and the
// per-sample arg-max, in one launch.
//
// Work split: block = (sample b, window k, strip of kRowsPerBlock window rows). Each warp
// walks whole rows of its strip, 32 consecutive pixels at a time (coalesced reads), and adds
// them to its own shared-memory histogram. Lanes holding the same class are grouped with
// __match_any_sync so one leader adds the group size: a window dominated by one class
// (road, sky) costs one shared atomic per warp step instead of 32 colliding ones.
// The block then adds its merged histogram to the window's global uint64 counts.
//
// The last block to finish a sample (ticket counter per sample, threadfence pattern)
// scores the K windows of that sample and writes the arg-max window, so no second launch
// and no host round trip is needed.
#include <cmath>

#include "cuda_utils.cuh"
#include "sepico_ops.h"

namespace sepico_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kRowsPerBlock = 16;

struct CropGeometry {
  int64_t height, width;        // label map
  int64_t crop_h, crop_w;       // window
  int64_t num_windows;          // K
  int64_t strips;               // blocks per window
  int num_classes;              // C
  int64_t ignore_index;
  double cat_max_ratio;
};

// Offsets of window (b,k), clamped so the window lies inside the map.
__device__ __forceinline__ void window_origin(const int64_t* offsets, int64_t b, int64_t k,
                                              const CropGeometry& g, int64_t* y0, int64_t* x0) {
  const int64_t* o = offsets + (b * g.num_windows + k) * 2;
  *y0 = detail::clamp64(o[0], 0, g.height - g.crop_h);
  *x0 = detail::clamp64(o[1], 0, g.width - g.crop_w);
}

// Score of one window from its class counts (see sepico_ops.h for the formula).
__device__ float window_score(const unsigned long long* counts, const CropGeometry& g) {
  unsigned long long total = 0, largest = 0;
  int present = 0;
  double log_sum = 0.0;
  for (int c = 0; c < g.num_classes; ++c) {
    // L2 load: the counts were written by atomics of other blocks.
    const unsigned long long n = __ldcg(counts + c);
    total += n;
    largest = n > largest ? n : largest;
    present += n >= 1ULL;
    if (n > 1ULL) {
      log_sum += log(static_cast<double>(n));
    }
  }
  const bool balanced =
      present >= 2 && static_cast<double>(largest) / static_cast<double>(total) < g.cat_max_ratio;
  return balanced ? static_cast<float>(log_sum) : 0.0f;
}

template <typename Label>
__global__ void __launch_bounds__(kThreads)
    crop_scores_kernel(const Label* __restrict__ labels, const int64_t* __restrict__ offsets,
                       CropGeometry g, unsigned long long* __restrict__ counts,
                       unsigned int* __restrict__ tickets, float* __restrict__ scores,
                       int64_t* __restrict__ best) {
  extern __shared__ unsigned int warp_hist[];  // [kWarps][C]
  __shared__ bool is_last_block;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t block = blockIdx.x;
  const int64_t strip = block % g.strips;
  block /= g.strips;
  const int64_t k = block % g.num_windows;
  const int64_t b = block / g.num_windows;
  const int num_classes = g.num_classes;

  for (int i = threadIdx.x; i < kWarps * num_classes; i += kThreads) {
    warp_hist[i] = 0u;
  }
  __syncthreads();

  int64_t y0, x0;
  window_origin(offsets, b, k, g, &y0, &x0);
  const int64_t row_begin = strip * kRowsPerBlock;
  const int64_t row_end = row_begin + kRowsPerBlock < g.crop_h ? row_begin + kRowsPerBlock : g.crop_h;
  unsigned int* hist = warp_hist + warp * num_classes;
  const Label* image = labels + b * g.height * g.width;

  for (int64_t r = row_begin + warp; r < row_end; r += kWarps) {
    const Label* row = image + (y0 + r) * g.width + x0;
    // The bound is the same for the whole warp, so every lane reaches the warp intrinsics.
    for (int64_t col0 = 0; col0 < g.crop_w; col0 += 32) {
      const int64_t col = col0 + lane;
      int64_t v = -1;
      if (col < g.crop_w) {
        v = static_cast<int64_t>(row[col]);
      }
      const bool counted = v >= 0 && v < num_classes && v != g.ignore_index;
      const unsigned int active = __ballot_sync(0xffffffffu, counted);
      if (counted) {
        const unsigned int peers = __match_any_sync(active, static_cast<int>(v));
        if (lane == __ffs(peers) - 1) {
          atomicAdd(hist + v, static_cast<unsigned int>(__popc(peers)));
        }
      }
    }
  }
  __syncthreads();

  unsigned long long* window_counts = counts + (b * g.num_windows + k) * num_classes;
  for (int c = threadIdx.x; c < num_classes; c += kThreads) {
    unsigned int n = 0;
    for (int w = 0; w < kWarps; ++w) {
      n += warp_hist[w * num_classes + c];
    }
    if (n != 0u) {
      atomicAdd(window_counts + c, static_cast<unsigned long long>(n));
    }
  }

  // Publish this block's counts before taking a ticket; the last ticket of a sample
  // then sees every block's contribution.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int blocks_per_sample = static_cast<unsigned int>(g.strips * g.num_windows);
    is_last_block = atomicAdd(tickets + b, 1u) == blocks_per_sample - 1u;
  }
  __syncthreads();
  if (!is_last_block) {
    return;
  }
  __threadfence();

  float* sample_scores = scores + b * g.num_windows;
  for (int64_t kk = threadIdx.x; kk < g.num_windows; kk += kThreads) {
    sample_scores[kk] = window_score(counts + (b * g.num_windows + kk) * num_classes, g);
  }
  __syncthreads();  // block-level visibility of sample_scores for thread 0
  if (threadIdx.x == 0) {
    int64_t best_k = 0;
    float best_score = sample_scores[0];
    for (int64_t kk = 1; kk < g.num_windows; ++kk) {
      if (sample_scores[kk] > best_score) {  // strict: the first window wins ties
        best_score = sample_scores[kk];
        best_k = kk;
      }
    }
    int64_t by, bx;
    window_origin(offsets, b, best_k, g, &by, &bx);
    best[b * 2] = by;
    best[b * 2 + 1] = bx;
  }
}

size_t counts_bytes(int64_t batch, int64_t num_windows, int num_classes) {
  return static_cast<size_t>(batch) * static_cast<size_t>(num_windows) *
         static_cast<size_t>(num_classes) * sizeof(unsigned long long);
}

template <typename Label>
cudaError_t launch(const void* labels, const int64_t* offsets, const CropGeometry& g,
                   int64_t batch, unsigned long long* counts, unsigned int* tickets, float* scores,
                   int64_t* best, cudaStream_t stream) {
  const int64_t blocks = batch * g.num_windows * g.strips;
  const size_t shared = static_cast<size_t>(kWarps) * g.num_classes * sizeof(unsigned int);
  crop_scores_kernel<Label><<<static_cast<unsigned int>(blocks), kThreads, shared, stream>>>(
      static_cast<const Label*>(labels), offsets, g, counts, tickets, scores, best);
  SEPICO_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

size_t crop_scores_workspace_bytes(int64_t batch, int64_t num_windows, int num_classes) {
  if (batch <= 0 || num_windows <= 0 || num_classes <= 0) {
    return 0;
  }
  return counts_bytes(batch, num_windows, num_classes) +
         static_cast<size_t>(batch) * sizeof(unsigned int);
}

cudaError_t crop_scores(const void* labels, LabelType label_type, int64_t batch, int64_t height,
                        int64_t width, const int64_t* offsets, int64_t num_windows, int64_t crop_h,
                        int64_t crop_w, int num_classes, double cat_max_ratio,
                        int64_t ignore_index, void* workspace, size_t workspace_bytes,
                        float* scores, int64_t* best, cudaStream_t stream) {
  if (batch < 0 || num_windows < 1 || crop_h < 1 || crop_w < 1 || crop_h > height ||
      crop_w > width || num_classes < 1 || num_classes > kMaxCropClasses) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) {
    return cudaSuccess;
  }
  const size_t needed = crop_scores_workspace_bytes(batch, num_windows, num_classes);
  if (workspace == nullptr || workspace_bytes < needed) {
    return cudaErrorInvalidValue;
  }
  CropGeometry g;
  g.height = height;
  g.width = width;
  g.crop_h = crop_h;
  g.crop_w = crop_w;
  g.num_windows = num_windows;
  g.strips = detail::ceil_div(crop_h, kRowsPerBlock);
  g.num_classes = num_classes;
  g.ignore_index = ignore_index;
  g.cat_max_ratio = cat_max_ratio;
  // One flat grid; the ticket counter compares against strips*K in 32 bits.
  if (batch * num_windows * g.strips > 0x7fffffffLL || num_windows * g.strips > 0xffffffffLL) {
    return cudaErrorInvalidConfiguration;
  }

  auto* counts = static_cast<unsigned long long*>(workspace);
  auto* tickets = reinterpret_cast<unsigned int*>(static_cast<char*>(workspace) +
                                                  counts_bytes(batch, num_windows, num_classes));
  SEPICO_RETURN_IF_ERROR(cudaMemsetAsync(workspace, 0, needed, stream));

  switch (label_type) {
    case LabelType::kUInt8:
      return launch<uint8_t>(labels, offsets, g, batch, counts, tickets, scores, best, stream);
    case LabelType::kInt32:
      return launch<int32_t>(labels, offsets, g, batch, counts, tickets, scores, best, stream);
    case LabelType::kInt64:
      return launch<int64_t>(labels, offsets, g, batch, counts, tickets, scores, best, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sepico_ops
