// Device time of each launcher at the training size (B=2 target images 640x1280, K=10
// windows of 640x640, C=19). Usage: bench_ops [iterations]
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "sepico_ops.h"
#include "test_common.h"

namespace {

template <typename F>
float median_ms(F&& fn, int iterations) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn();  // warm-up
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    fn();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  skip_without_gpu();
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 50;
  constexpr int64_t kB = 2, kH = 640, kW = 1280, kK = 10, kCrop = 640, kC = 19, kP = kH * kW;
  std::mt19937 rng(0);

  // Crop scoring on blocky pseudo labels.
  std::vector<int64_t> labels(kB * kP);
  std::uniform_int_distribution<int> cls(0, kC - 1);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t y = 0; y < kH; ++y)
      for (int64_t x = 0; x < kW; ++x)
        labels[b * kP + y * kW + x] = ((y / 64) * 7 + (x / 96) * 3 + b) % kC;
  std::vector<int64_t> offsets(kB * kK * 2);
  std::uniform_int_distribution<int64_t> xs(0, kW - kCrop);
  for (size_t i = 0; i < offsets.size(); i += 2) { offsets[i] = 0; offsets[i + 1] = xs(rng); }
  DeviceBuffer<int64_t> d_labels(labels), d_offsets(offsets), d_best(kB * 2);
  DeviceBuffer<float> d_scores(kB * kK);
  const size_t ws = sepico_ops::crop_scores_workspace_bytes(kB, kK, kC);
  DeviceBuffer<unsigned char> d_ws(ws);
  const float crop_ms = median_ms([&] {
    CHECK_CUDA(sepico_ops::crop_scores(d_labels.ptr, sepico_ops::LabelType::kInt64, kB, kH, kW,
                                       d_offsets.ptr, kK, kCrop, kCrop, kC, 0.75, 255, d_ws.ptr,
                                       ws, d_scores.ptr, d_best.ptr, nullptr));
  }, iterations);
  std::printf("crop_scores   B=%lld K=%lld %lldx%lld in %lldx%lld: %.4f ms\n", (long long)kB,
              (long long)kK, (long long)kCrop, (long long)kCrop, (long long)kH, (long long)kW,
              crop_ms);

  // ClassMix on 640x640 crops.
  constexpr int64_t kMixP = kCrop * kCrop;
  std::vector<float> img(kB * 3 * kMixP, 0.5f), weight(kB * kMixP, 0.9f);
  std::vector<int64_t> src_lbl(kB * kMixP), tgt_lbl(kB * kMixP, 1);
  for (auto& v : src_lbl) v = cls(rng);
  std::vector<uint8_t> mix(kB * 256, 0);
  for (int64_t b = 0; b < kB; ++b)
    for (int c = 0; c < kC; c += 2) mix[b * 256 + c] = 1;
  DeviceBuffer<float> d_src(img), d_tgt(img), d_out(img.size()), d_w(weight), d_out_w(kB * kMixP);
  DeviceBuffer<int64_t> d_src_lbl(src_lbl), d_tgt_lbl(tgt_lbl), d_out_lbl(kB * kMixP);
  DeviceBuffer<uint8_t> d_mix(mix);
  const float mix_ms = median_ms([&] {
    CHECK_CUDA(sepico_ops::classmix(d_src.ptr, d_tgt.ptr, sepico_ops::FloatType::kFloat32, kB, 3,
                                    kCrop, kCrop, d_src_lbl.ptr, d_tgt_lbl.ptr, d_w.ptr,
                                    d_mix.ptr, d_out.ptr, d_out_lbl.ptr, d_out_w.ptr, nullptr));
  }, iterations);
  std::printf("classmix      B=%lld 3x%lldx%lld: %.4f ms\n", (long long)kB, (long long)kCrop,
              (long long)kCrop, mix_ms);

  // Pseudo labels from full-resolution target logits.
  std::vector<float> logits(kB * kC * kP);
  std::normal_distribution<float> n(0.f, 3.f);
  for (auto& v : logits) v = n(rng);
  DeviceBuffer<float> d_logits(logits), d_prob(kB * kP), d_q(1);
  DeviceBuffer<int64_t> d_label(kB * kP);
  DeviceBuffer<unsigned char> d_pws(sepico_ops::pseudo_label_workspace_bytes());
  const float pl_ms = median_ms([&] {
    CHECK_CUDA(sepico_ops::pseudo_label(d_logits.ptr, sepico_ops::FloatType::kFloat32, kB, kC, kH,
                                        kW, 0.968f, d_pws.ptr, d_pws.n, d_prob.ptr,
                                        d_label.ptr, d_q.ptr, nullptr));
  }, iterations);
  const double gb = (kB * kC * kP * 4.0 + kB * kP * 12.0) / 1e9;
  std::printf("pseudo_label  B=%lld C=%lld %lldx%lld: %.4f ms (%.0f GB/s)\n", (long long)kB,
              (long long)kC, (long long)kH, (long long)kW, pl_ms, gb / (pl_ms * 1e-3));
  return 0;
}
