// GPU ClassMix vs a CPU loop; labels include 255 (ignore, may be chosen) and out-of-range values.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_fp16.h>

#include "sepico_ops.h"
#include "test_common.h"

namespace {

constexpr int64_t kB = 3, kC = 3, kH = 37, kW = 53, kP = kH * kW;

struct Inputs {
  std::vector<float> src_img, tgt_img, tgt_weight;
  std::vector<int64_t> src_lbl, tgt_lbl;
  std::vector<uint8_t> mix;
};

Inputs make_inputs(std::mt19937& rng) {
  Inputs in;
  std::normal_distribution<float> n(0.f, 1.f);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::uniform_int_distribution<int> lbl(0, 21);
  in.src_img.resize(kB * kC * kP);
  in.tgt_img.resize(kB * kC * kP);
  for (auto& v : in.src_img) v = n(rng);
  for (auto& v : in.tgt_img) v = n(rng);
  in.src_lbl.resize(kB * kP);
  in.tgt_lbl.resize(kB * kP);
  in.tgt_weight.resize(kB * kP);
  for (int64_t i = 0; i < kB * kP; ++i) {
    const int v = lbl(rng);
    // 19 -> 255 (ignore), 20 -> 300 and 21 -> -1 (outside the 256-entry table: never mixed)
    in.src_lbl[i] = v == 19 ? 255 : (v == 20 ? 300 : (v == 21 ? -1 : v));
    in.tgt_lbl[i] = lbl(rng) % 19;
    in.tgt_weight[i] = u(rng);
  }
  in.mix.assign(kB * 256, 0);
  for (int64_t b = 0; b < kB; ++b) {
    for (int c = 0; c < 256; ++c) in.mix[b * 256 + c] = u(rng) < 0.5f;
  }
  in.mix[0 * 256 + 255] = 1;  // sample 0 mixes the ignore class in (quirk)
  in.mix[1 * 256 + 255] = 0;
  return in;
}

bool chosen(const Inputs& in, int64_t b, int64_t label) {
  return label >= 0 && label < 256 && in.mix[b * 256 + label];
}

template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__half from_float<__half>(float v) { return __float2half(v); }

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T>
void run(const Inputs& in, sepico_ops::FloatType type, const char* name) {
  std::vector<T> src(in.src_img.size()), tgt(in.tgt_img.size());
  for (size_t i = 0; i < src.size(); ++i) src[i] = from_float<T>(in.src_img[i]);
  for (size_t i = 0; i < tgt.size(); ++i) tgt[i] = from_float<T>(in.tgt_img[i]);
  DeviceBuffer<T> d_src(src), d_tgt(tgt), d_out(src.size());
  DeviceBuffer<int64_t> d_src_lbl(in.src_lbl), d_tgt_lbl(in.tgt_lbl), d_out_lbl(kB * kP);
  DeviceBuffer<float> d_w(in.tgt_weight), d_out_w(kB * kP);
  DeviceBuffer<uint8_t> d_mix(in.mix);
  CHECK_CUDA(sepico_ops::classmix(d_src.ptr, d_tgt.ptr, type, kB, kC, kH, kW, d_src_lbl.ptr,
                                  d_tgt_lbl.ptr, d_w.ptr, d_mix.ptr, d_out.ptr, d_out_lbl.ptr,
                                  d_out_w.ptr, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto out = d_out.to_host();
  const auto out_lbl = d_out_lbl.to_host();
  const auto out_w = d_out_w.to_host();
  int64_t mixed_pixels = 0;
  for (int64_t b = 0; b < kB; ++b) {
    for (int64_t p = 0; p < kP; ++p) {
      const int64_t i = b * kP + p;
      const bool m = chosen(in, b, in.src_lbl[i]);
      mixed_pixels += m;
      EXPECT(out_lbl[i] == (m ? in.src_lbl[i] : in.tgt_lbl[i]), "%s label at %lld", name,
             (long long)i);
      EXPECT(out_w[i] == (m ? 1.0f : in.tgt_weight[i]), "%s weight at %lld", name, (long long)i);
      for (int64_t c = 0; c < kC; ++c) {
        const int64_t j = (b * kC + c) * kP + p;
        EXPECT(same_bits(out[j], m ? src[j] : tgt[j]), "%s image at %lld", name, (long long)j);
      }
    }
  }
  EXPECT(mixed_pixels > 0 && mixed_pixels < kB * kP, "%s: degenerate mask", name);
  std::printf("ok  classmix %s (%lld of %lld pixels from the source)\n", name,
              (long long)mixed_pixels, (long long)(kB * kP));
}

}  // namespace

int main() {
  skip_without_gpu();
  std::mt19937 rng(7);
  const Inputs in = make_inputs(rng);
  run<float>(in, sepico_ops::FloatType::kFloat32, "fp32");
  run<__half>(in, sepico_ops::FloatType::kFloat16, "fp16");
  std::printf("test_classmix: all cases passed\n");
  return 0;
}
