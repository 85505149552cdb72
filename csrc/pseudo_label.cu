// Fused pseudo labels: per pixel max softmax probability and arg-max class in one read of
// the logits, plus the count of confident pixels reduced per block (one atomic per block).
//
// Online softmax over the class axis (stride H*W, so a warp reads 32 consecutive pixels of
// one class plane per step): keeping the running max m and s = Σ exp(l_c - m),
//   new max v > m:  s <- s·exp(m - v) + 1,  m <- v
//   otherwise:      s <- s + exp(v - m)
// and max_c softmax_c = exp(m - m) / s = 1 / s.
#include "cuda_utils.cuh"
#include "sepico_ops.h"

namespace sepico_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pseudo_label_kernel(const T* __restrict__ logits, int64_t classes, int64_t pixels,
                        int64_t total, float threshold, float* __restrict__ prob,
                        int64_t* __restrict__ label, unsigned long long* __restrict__ confident) {
  __shared__ unsigned int warp_counts[kWarps];
  unsigned int count = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += stride) {
    const int64_t b = i / pixels;
    const int64_t p = i - b * pixels;
    const T* x = logits + b * classes * pixels + p;
    float m = detail::to_float(x[0]);
    float s = 1.0f;
    int64_t arg = 0;
    for (int64_t c = 1; c < classes; ++c) {
      const float v = detail::to_float(x[c * pixels]);
      if (v > m) {  // strict: the first maximal class wins ties, as torch.max does
        s = s * expf(m - v) + 1.0f;
        m = v;
        arg = c;
      } else {
        s += expf(v - m);
      }
    }
    const float pr = 1.0f / s;
    prob[i] = pr;
    label[i] = arg;
    count += pr >= threshold ? 1u : 0u;
  }

  // Block reduction of the confident-pixel count; every thread of the block gets here.
  for (int offset = 16; offset > 0; offset >>= 1) {
    count += __shfl_down_sync(0xffffffffu, count, offset);
  }
  if ((threadIdx.x & 31) == 0) {
    warp_counts[threadIdx.x >> 5] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long block_count = 0;
    for (int w = 0; w < kWarps; ++w) {
      block_count += warp_counts[w];
    }
    if (block_count != 0ULL) {
      atomicAdd(confident, block_count);
    }
  }
}

// q = count / total, the ratio in double as upstream's Python division, stored as fp32.
__global__ void confident_ratio_kernel(const unsigned long long* __restrict__ confident,
                                       int64_t total, float* __restrict__ q) {
  q[0] = static_cast<float>(static_cast<double>(*confident) / static_cast<double>(total));
}

template <typename T>
cudaError_t launch(const void* logits, int64_t classes, int64_t pixels, int64_t total,
                   float threshold, unsigned long long* confident, float* prob, int64_t* label,
                   float* q, cudaStream_t stream) {
  int64_t blocks = detail::ceil_div(total, kThreads);
  blocks = blocks < detail::kMaxGridX ? blocks : detail::kMaxGridX;
  pseudo_label_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), classes, pixels, total, threshold, prob, label, confident);
  SEPICO_RETURN_IF_LAUNCH_FAILED();
  confident_ratio_kernel<<<1, 1, 0, stream>>>(confident, total, q);
  SEPICO_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

size_t pseudo_label_workspace_bytes() { return sizeof(unsigned long long); }

cudaError_t pseudo_label(const void* logits, FloatType logit_type, int64_t batch, int64_t classes,
                         int64_t height, int64_t width, float threshold, void* workspace,
                         size_t workspace_bytes, float* prob, int64_t* label, float* q,
                         cudaStream_t stream) {
  if (batch < 0 || classes < 1 || height < 0 || width < 0 || workspace == nullptr ||
      workspace_bytes < pseudo_label_workspace_bytes()) {
    return cudaErrorInvalidValue;
  }
  const int64_t pixels = height * width;
  const int64_t total = batch * pixels;
  auto* confident = static_cast<unsigned long long*>(workspace);
  SEPICO_RETURN_IF_ERROR(cudaMemsetAsync(confident, 0, sizeof(unsigned long long), stream));
  if (total == 0) {
    // No pixels: q = 0/0 = NaN, like torch's mean of an empty tensor.
    confident_ratio_kernel<<<1, 1, 0, stream>>>(confident, total, q);
    SEPICO_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  }
  switch (logit_type) {
    case FloatType::kFloat32:
      return launch<float>(logits, classes, pixels, total, threshold, confident, prob, label, q,
                           stream);
    case FloatType::kFloat16:
      return launch<__half>(logits, classes, pixels, total, threshold, confident, prob, label, q,
                            stream);
    case FloatType::kBFloat16:
      return launch<__nv_bfloat16>(logits, classes, pixels, total, threshold, confident, prob,
                                   label, q, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sepico_ops
