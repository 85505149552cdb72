// GPU pseudo labels vs a CPU two-pass softmax in double precision.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "sepico_ops.h"
#include "test_common.h"

int main() {
  skip_without_gpu();
  constexpr int64_t kB = 2, kC = 19, kH = 45, kW = 61, kP = kH * kW, kN = kB * kP;
  constexpr float kThreshold = 0.968f;
  std::mt19937 rng(99);
  std::normal_distribution<float> n(0.f, 1.f);
  std::uniform_real_distribution<float> u(0.f, 1.f);

  std::vector<float> logits(kB * kC * kP);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t p = 0; p < kP; ++p) {
      // A per-pixel scale spreads the confidence over [1/C, 1) so both sides of the threshold occur.
      const float scale = 12.f * u(rng);
      for (int64_t c = 0; c < kC; ++c) logits[(b * kC + c) * kP + p] = scale * n(rng);
      if (p % 97 == 0) {  // exact tie between classes 4 and 11 as the maximum
        logits[(b * kC + 4) * kP + p] = 50.f;
        logits[(b * kC + 11) * kP + p] = 50.f;
      }
    }

  DeviceBuffer<float> d_logits(logits), d_prob(kN), d_q(1);
  DeviceBuffer<int64_t> d_label(kN);
  DeviceBuffer<unsigned char> d_ws(sepico_ops::pseudo_label_workspace_bytes());
  CHECK_CUDA(sepico_ops::pseudo_label(d_logits.ptr, sepico_ops::FloatType::kFloat32, kB, kC, kH,
                                      kW, kThreshold, d_ws.ptr, d_ws.n, d_prob.ptr, d_label.ptr,
                                      d_q.ptr, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto prob = d_prob.to_host();
  const auto label = d_label.to_host();
  const float q = d_q.to_host()[0];

  int64_t confident = 0, near_threshold = 0;
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t p = 0; p < kP; ++p) {
      double m = -INFINITY;
      int64_t arg = 0;
      for (int64_t c = 0; c < kC; ++c) {
        const double v = logits[(b * kC + c) * kP + p];
        if (v > m) { m = v; arg = c; }
      }
      double s = 0.0;
      for (int64_t c = 0; c < kC; ++c) s += std::exp(logits[(b * kC + c) * kP + p] - m);
      const double ref = 1.0 / s;
      const int64_t i = b * kP + p;
      EXPECT(label[i] == arg, "label at %lld: %lld vs %lld", (long long)i, (long long)label[i],
             (long long)arg);
      EXPECT(std::fabs(prob[i] - ref) <= 2e-6 * ref, "prob at %lld: %.9g vs %.9g",
             (long long)i, prob[i], ref);
      confident += static_cast<float>(ref) >= kThreshold;
      near_threshold += std::fabs(ref - kThreshold) < 1e-5;
    }
  const double q_ref = static_cast<double>(confident) / kN;
  EXPECT(confident > 0 && confident < kN, "degenerate test data (%lld confident)", (long long)confident);
  EXPECT(std::fabs(q - q_ref) <= (near_threshold + 0.5) / kN, "q %.9g vs %.9g", q, q_ref);
  std::printf("ok  pseudo_label: q=%.6f (reference %.6f)\ntest_pseudo_label: all cases passed\n",
              q, q_ref);
  return 0;
}
