// ClassMix in one pass: mask from the source label and the sample's chosen classes, then the
// mixed image, label and pixel weight. Each thread owns one pixel position and reads only the
// side (source or target) the mask keeps, so the two images cost one image read, not two.
#include "cuda_utils.cuh"
#include "sepico_ops.h"

namespace sepico_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kTableSize = 256;  // label values 0..255; 255 (ignore) may be a chosen class

template <typename T>
__global__ void __launch_bounds__(kThreads)
    classmix_kernel(const T* __restrict__ src_img, const T* __restrict__ tgt_img, int64_t channels,
                    int64_t pixels, const int64_t* __restrict__ src_lbl,
                    const int64_t* __restrict__ tgt_lbl, const float* __restrict__ tgt_weight,
                    const uint8_t* __restrict__ mix_classes, T* __restrict__ mixed_img,
                    int64_t* __restrict__ mixed_lbl, float* __restrict__ mixed_weight) {
  __shared__ uint8_t chosen[kTableSize];
  const int64_t b = blockIdx.y;
  for (int i = threadIdx.x; i < kTableSize; i += kThreads) {
    chosen[i] = mix_classes[b * kTableSize + i];
  }
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < pixels;
       p += stride) {
    const int64_t i = b * pixels + p;
    const int64_t label = src_lbl[i];
    const bool from_source = label >= 0 && label < kTableSize && chosen[label] != 0;
    mixed_lbl[i] = from_source ? label : tgt_lbl[i];
    mixed_weight[i] = from_source ? 1.0f : tgt_weight[i];
    const T* side = from_source ? src_img : tgt_img;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t j = (b * channels + c) * pixels + p;
      mixed_img[j] = side[j];
    }
  }
}

template <typename T>
cudaError_t launch(const void* src_img, const void* tgt_img, int64_t batch, int64_t channels,
                   int64_t pixels, const int64_t* src_lbl, const int64_t* tgt_lbl,
                   const float* tgt_weight, const uint8_t* mix_classes, void* mixed_img,
                   int64_t* mixed_lbl, float* mixed_weight, cudaStream_t stream) {
  int64_t blocks_x = detail::ceil_div(pixels, kThreads);
  // Enough blocks to fill the device; the grid-stride loop covers the rest.
  const int64_t max_blocks_x = 4096 / (batch < 4096 ? batch : 4096) + 1;
  blocks_x = blocks_x < max_blocks_x ? blocks_x : max_blocks_x;
  const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(batch));
  classmix_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(src_img), static_cast<const T*>(tgt_img), channels, pixels, src_lbl,
      tgt_lbl, tgt_weight, mix_classes, static_cast<T*>(mixed_img), mixed_lbl, mixed_weight);
  SEPICO_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

cudaError_t classmix(const void* src_img, const void* tgt_img, FloatType img_type, int64_t batch,
                     int64_t channels, int64_t height, int64_t width, const int64_t* src_lbl,
                     const int64_t* tgt_lbl, const float* tgt_weight, const uint8_t* mix_classes,
                     void* mixed_img, int64_t* mixed_lbl, float* mixed_weight,
                     cudaStream_t stream) {
  if (batch < 0 || channels < 0 || height < 0 || width < 0 || batch > 65535) {
    return cudaErrorInvalidValue;
  }
  const int64_t pixels = height * width;
  if (batch == 0 || pixels == 0) {
    return cudaSuccess;
  }
  switch (img_type) {
    case FloatType::kFloat32:
      return launch<float>(src_img, tgt_img, batch, channels, pixels, src_lbl, tgt_lbl,
                           tgt_weight, mix_classes, mixed_img, mixed_lbl, mixed_weight, stream);
    case FloatType::kFloat16:
      return launch<__half>(src_img, tgt_img, batch, channels, pixels, src_lbl, tgt_lbl,
                            tgt_weight, mix_classes, mixed_img, mixed_lbl, mixed_weight, stream);
    case FloatType::kBFloat16:
      return launch<__nv_bfloat16>(src_img, tgt_img, batch, channels, pixels, src_lbl, tgt_lbl,
                                   tgt_weight, mix_classes, mixed_img, mixed_lbl, mixed_weight,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sepico_ops
