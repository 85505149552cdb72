// GPU crop scoring vs a CPU loop over every window pixel.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "sepico_ops.h"
#include "test_common.h"

namespace {

struct Case {
  const char* name;
  int64_t batch, height, width, windows, crop_h, crop_w;
  int classes;
  int64_t ignore;
  double ratio;
};

// CPU reference of one window's score (same formula as sepico_ops.h).
float reference_score(const std::vector<int64_t>& labels, const Case& c, int64_t b, int64_t y0,
                      int64_t x0) {
  std::vector<uint64_t> counts(c.classes, 0);
  for (int64_t y = y0; y < y0 + c.crop_h; ++y) {
    for (int64_t x = x0; x < x0 + c.crop_w; ++x) {
      const int64_t v = labels[(b * c.height + y) * c.width + x];
      if (v >= 0 && v < c.classes && v != c.ignore) {
        ++counts[v];
      }
    }
  }
  uint64_t total = 0, largest = 0;
  int present = 0;
  double log_sum = 0.0;
  for (uint64_t n : counts) {
    total += n;
    largest = n > largest ? n : largest;
    present += n >= 1;
    if (n > 1) log_sum += std::log(static_cast<double>(n));
  }
  const bool ok = present >= 2 && static_cast<double>(largest) / static_cast<double>(total) < c.ratio;
  return ok ? static_cast<float>(log_sum) : 0.0f;
}

int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <typename Label>
void run_case(const Case& c, const std::vector<int64_t>& labels, const std::vector<int64_t>& offsets,
              sepico_ops::LabelType type) {
  std::vector<Label> typed(labels.begin(), labels.end());
  DeviceBuffer<Label> d_labels(typed);
  DeviceBuffer<int64_t> d_offsets(offsets);
  DeviceBuffer<float> d_scores(c.batch * c.windows);
  DeviceBuffer<int64_t> d_best(c.batch * 2);
  const size_t ws = sepico_ops::crop_scores_workspace_bytes(c.batch, c.windows, c.classes);
  DeviceBuffer<unsigned char> d_ws(ws);
  CHECK_CUDA(sepico_ops::crop_scores(d_labels.ptr, type, c.batch, c.height, c.width,
                                     d_offsets.ptr, c.windows, c.crop_h, c.crop_w, c.classes,
                                     c.ratio, c.ignore, d_ws.ptr, ws, d_scores.ptr, d_best.ptr,
                                     nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> scores = d_scores.to_host();
  const std::vector<int64_t> best = d_best.to_host();

  for (int64_t b = 0; b < c.batch; ++b) {
    int64_t best_k = 0;
    float best_score = -1.0f;
    for (int64_t k = 0; k < c.windows; ++k) {
      const int64_t y0 = clamp(offsets[(b * c.windows + k) * 2], 0, c.height - c.crop_h);
      const int64_t x0 = clamp(offsets[(b * c.windows + k) * 2 + 1], 0, c.width - c.crop_w);
      const float ref = reference_score(labels, c, b, y0, x0);
      const float got = scores[b * c.windows + k];
      EXPECT(std::fabs(got - ref) <= 1e-6f * std::fabs(ref) + 1e-6f,
             "%s: b=%lld k=%lld score %.9g vs reference %.9g", c.name, (long long)b,
             (long long)k, got, ref);
      if (ref > best_score) {
        best_score = ref;
        best_k = k;
      }
    }
    const int64_t by = clamp(offsets[(b * c.windows + best_k) * 2], 0, c.height - c.crop_h);
    const int64_t bx = clamp(offsets[(b * c.windows + best_k) * 2 + 1], 0, c.width - c.crop_w);
    EXPECT(best[b * 2] == by && best[b * 2 + 1] == bx,
           "%s: b=%lld best (%lld,%lld) vs reference (%lld,%lld)", c.name, (long long)b,
           (long long)best[b * 2], (long long)best[b * 2 + 1], (long long)by, (long long)bx);
  }
  std::printf("ok  %-28s label bytes=%zu\n", c.name, sizeof(Label));
}

void run_all_types(const Case& c, const std::vector<int64_t>& labels,
                   const std::vector<int64_t>& offsets) {
  run_case<int64_t>(c, labels, offsets, sepico_ops::LabelType::kInt64);
  run_case<int32_t>(c, labels, offsets, sepico_ops::LabelType::kInt32);
  run_case<uint8_t>(c, labels, offsets, sepico_ops::LabelType::kUInt8);
}

std::vector<int64_t> random_offsets(const Case& c, std::mt19937& rng, bool allow_outside) {
  std::vector<int64_t> offsets(c.batch * c.windows * 2);
  const int64_t slack = allow_outside ? 5 : 0;
  std::uniform_int_distribution<int64_t> ys(-slack, c.height - c.crop_h + slack);
  std::uniform_int_distribution<int64_t> xs(-slack, c.width - c.crop_w + slack);
  for (size_t i = 0; i < offsets.size(); i += 2) {
    offsets[i] = ys(rng);
    offsets[i + 1] = xs(rng);
  }
  return offsets;
}

}  // namespace

int main() {
  skip_without_gpu();
  std::mt19937 rng(1234);

  {  // Blocky random maps with ignore pixels; some offsets outside the map (clamped).
    const Case c{"random blocks", 3, 70, 131, 10, 40, 64, 19, 255, 0.75};
    std::vector<int64_t> labels(c.batch * c.height * c.width);
    std::uniform_int_distribution<int> cls(0, 19);  // 19 -> ignore
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t by = 0; by < c.height; by += 8)
        for (int64_t bx = 0; bx < c.width; bx += 8) {
          const int v = cls(rng);
          for (int64_t y = by; y < std::min<int64_t>(by + 8, c.height); ++y)
            for (int64_t x = bx; x < std::min<int64_t>(bx + 8, c.width); ++x)
              labels[(b * c.height + y) * c.width + x] = v == 19 ? 255 : v;
        }
    run_all_types(c, labels, random_offsets(c, rng, true));
  }
  {  // Mostly one class: the cat_max_ratio rule zeroes most windows.
    const Case c{"dominant class", 2, 48, 96, 12, 32, 40, 19, 255, 0.75};
    std::vector<int64_t> labels(c.batch * c.height * c.width, 0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (auto& v : labels) v = u(rng) < 0.2 ? 1 + static_cast<int64_t>(u(rng) * 5) : 0;
    run_all_types(c, labels, random_offsets(c, rng, false));
  }
  {  // One class everywhere: every score is 0 and the first window wins.
    const Case c{"single class", 2, 32, 32, 6, 16, 16, 19, 255, 0.75};
    std::vector<int64_t> labels(c.batch * c.height * c.width, 7);
    run_all_types(c, labels, random_offsets(c, rng, false));
  }
  {  // Only ignore pixels in the left half: windows there score 0.
    const Case c{"ignore only windows", 2, 32, 64, 8, 16, 16, 19, 255, 0.75};
    std::vector<int64_t> labels(c.batch * c.height * c.width);
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t y = 0; y < c.height; ++y)
        for (int64_t x = 0; x < c.width; ++x)
          labels[(b * c.height + y) * c.width + x] = x < 32 ? 255 : (x + y) % 3;
    run_all_types(c, labels, random_offsets(c, rng, false));
  }
  {  // Periodic map: windows shifted by the period have identical histograms (ties).
    const Case c{"ties", 2, 40, 40, 9, 20, 20, 19, 255, 0.75};
    std::vector<int64_t> labels(c.batch * c.height * c.width);
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t y = 0; y < c.height; ++y)
        for (int64_t x = 0; x < c.width; ++x)
          labels[(b * c.height + y) * c.width + x] = (y % 4) * 4 + (x % 4);
    std::vector<int64_t> offsets;
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t k = 0; k < c.windows; ++k) {
        offsets.push_back((k % 3) * 4);
        offsets.push_back((k / 3) * 4 + b);
      }
    run_all_types(c, labels, offsets);
  }
  {  // Ignore index inside the class range and a crop as large as the map.
    const Case c{"ignore index 3, full crop", 2, 24, 40, 3, 24, 40, 6, 3, 0.75};
    std::vector<int64_t> labels(c.batch * c.height * c.width);
    std::uniform_int_distribution<int> cls(0, 7);  // 6, 7 are outside [0, C)
    for (auto& v : labels) v = cls(rng);
    run_all_types(c, labels, random_offsets(c, rng, true));
  }
  std::printf("test_crop_scores: all cases passed\n");
  return 0;
}
