// Plain C++ launcher API of the sepico_fast CUDA kernels (no torch needed).
//
// Every launcher takes raw device pointers to contiguous row-major arrays, enqueues its
// work on `stream` and returns the first CUDA error it meets (a failed memset, a bad
// launch configuration, or cudaGetLastError() right after each launch); it never
// synchronises the stream. Sizes are int64 and all indexing inside the kernels is int64.
//
// The torch binding (torch_binding.cpp, built only by setup.py) and the C++ tests in
// csrc/tests/ are the two callers. See docs/csrc.md for the math and design notes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace sepico_ops {

enum class LabelType : int { kUInt8 = 0, kInt32 = 1, kInt64 = 2 };
enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest class count the crop-scoring kernel keeps in shared memory.
constexpr int kMaxCropClasses = 1024;

// ---------------------------------------------------------------------------------
// Class-balanced crop scoring (method §6 step 3).
//
//   labels   [B,H,W]   (uint8 / int32 / int64)
//   offsets  [B,K,2]   int64 (y0, x0); each is clamped into [0,H-h] x [0,W-w] first
//   scores   [B,K]     fp32 out
//   best     [B,2]     int64 out: clamped offsets of the arg-max window (first wins ties)
//
// For window (b,k), n_c = #pixels with label c, for c in [0,C) and c != ignore_index
// (labels outside [0,C) are ignored as well). With T = Σ n_c, P = #{c : n_c >= 1}:
//   score = Σ_{c : n_c > 1} log(n_c)    if P >= 2 and max_c n_c / T < cat_max_ratio
//         = 0                           otherwise
// The log-sum is accumulated in double in class order and rounded to fp32 once.
// One kernel launch for all B*K windows (plus a memset of the workspace); the last
// block to finish a sample scores its K windows and writes the arg-max.
// Requires 1 <= h <= H, 1 <= w <= W, 1 <= C <= kMaxCropClasses, K >= 1.
size_t crop_scores_workspace_bytes(int64_t batch, int64_t num_windows, int num_classes);

cudaError_t crop_scores(const void* labels, LabelType label_type, int64_t batch, int64_t height,
                        int64_t width, const int64_t* offsets, int64_t num_windows, int64_t crop_h,
                        int64_t crop_w, int num_classes, double cat_max_ratio,
                        int64_t ignore_index, void* workspace, size_t workspace_bytes,
                        float* scores, int64_t* best, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// ClassMix in one pass (method §6 step 8).
//
//   src_img, tgt_img [B,C,H,W] (fp32 / fp16 / bf16, same type), mixed_img likewise
//   src_lbl, tgt_lbl [B,H,W] int64; tgt_weight [B,H,W] fp32
//   mix_classes      [B,256] uint8 (0/1)
//   mask[b,p] = 0 <= src_lbl[b,p] < 256 && mix_classes[b, src_lbl[b,p]]
//   mixed_img = mask ? src_img : tgt_img        (= mask·src + (1-mask)·tgt for finite data)
//   mixed_lbl = mask ? src_lbl : tgt_lbl
//   mixed_w   = mask ? 1       : tgt_weight
// Each output pixel reads only the input it keeps. Requires B <= 65535.
cudaError_t classmix(const void* src_img, const void* tgt_img, FloatType img_type, int64_t batch,
                     int64_t channels, int64_t height, int64_t width, const int64_t* src_lbl,
                     const int64_t* tgt_lbl, const float* tgt_weight, const uint8_t* mix_classes,
                     void* mixed_img, int64_t* mixed_lbl, float* mixed_weight, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Pseudo labels (method §6 step 2): softmax over classes, max and arg-max, confidence ratio.
//
//   logits [B,C,H,W] (fp32 / fp16 / bf16)
//   prob   [B,H,W] fp32 = max_c softmax(logits)_c = 1 / Σ_c exp(l_c - max_c l_c)
//   label  [B,H,W] int64 = arg-max_c l_c (first wins ties)
//   q      [1] fp32 = #{prob >= threshold} / (B*H*W)   (count in uint64, ratio in double)
// One pass over the logits (online max / sum of exponentials), one block-level count
// reduction with one atomic per block, then a one-thread kernel that writes q.
size_t pseudo_label_workspace_bytes();

cudaError_t pseudo_label(const void* logits, FloatType logit_type, int64_t batch, int64_t classes,
                         int64_t height, int64_t width, float threshold, void* workspace,
                         size_t workspace_bytes, float* prob, int64_t* label, float* q,
                         cudaStream_t stream);

}  // namespace sepico_ops
