// Thin torch binding of the CUDA launchers as torch.library custom ops (namespace sepico_fast).
//
// Compiled only by setup.py (torch.utils.cpp_extension) into sepico_fast.ops._C; loading that
// module registers the ops below, and sepico_fast/ops/_dispatch.py registers their fake
// (shape) functions so torch.compile can trace through them. Inputs are validated and made
// contiguous by the Python wrappers; the checks here guard direct torch.ops calls.
//
// TORCH_LIBRARY_FRAGMENT rather than TORCH_LIBRARY: other layers may add ops to the same
// `sepico_fast` namespace from Python, and only one non-fragment definition may exist.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "sepico_ops.h"

namespace {

sepico_ops::LabelType label_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kByte:
      return sepico_ops::LabelType::kUInt8;
    case at::kInt:
      return sepico_ops::LabelType::kInt32;
    case at::kLong:
      return sepico_ops::LabelType::kInt64;
    default:
      TORCH_CHECK(false, name, " must be uint8, int32 or int64, got ", t.scalar_type());
  }
}

sepico_ops::FloatType float_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return sepico_ops::FloatType::kFloat32;
    case at::kHalf:
      return sepico_ops::FloatType::kFloat16;
    case at::kBFloat16:
      return sepico_ops::FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda_contiguous(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> crop_window_scores(const at::Tensor& labels,
                                                      const at::Tensor& offsets, int64_t crop_h,
                                                      int64_t crop_w, int64_t num_classes,
                                                      double cat_max_ratio, int64_t ignore_index) {
  const at::Device device = labels.device();
  check_cuda_contiguous(labels, "labels", device);
  check_cuda_contiguous(offsets, "offsets", device);
  TORCH_CHECK(labels.dim() == 3, "labels must be [B,H,W], got ", labels.sizes());
  TORCH_CHECK(offsets.dim() == 3 && offsets.size(0) == labels.size(0) && offsets.size(2) == 2,
              "offsets must be [B,K,2] with B = ", labels.size(0), ", got ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  TORCH_CHECK(offsets.size(1) >= 1, "offsets must hold at least one window");
  TORCH_CHECK(crop_h >= 1 && crop_w >= 1 && crop_h <= labels.size(1) && crop_w <= labels.size(2),
              "crop (", crop_h, ", ", crop_w, ") must fit the label map ", labels.sizes());
  TORCH_CHECK(num_classes >= 1 && num_classes <= sepico_ops::kMaxCropClasses,
              "num_classes must be in [1, ", sepico_ops::kMaxCropClasses, "], got ", num_classes);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t batch = labels.size(0), windows = offsets.size(1);
  at::Tensor scores = at::empty({batch, windows}, labels.options().dtype(at::kFloat));
  at::Tensor best = at::empty({batch, 2}, labels.options().dtype(at::kLong));
  const size_t ws_bytes =
      sepico_ops::crop_scores_workspace_bytes(batch, windows, static_cast<int>(num_classes));
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, labels.options().dtype(at::kByte));
  C10_CUDA_CHECK(sepico_ops::crop_scores(
      labels.data_ptr(), label_type_of(labels, "labels"), batch, labels.size(1), labels.size(2),
      offsets.data_ptr<int64_t>(), windows, crop_h, crop_w, static_cast<int>(num_classes),
      cat_max_ratio, ignore_index, workspace.data_ptr(), ws_bytes, scores.data_ptr<float>(),
      best.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return {scores, best};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> classmix(const at::Tensor& src_img,
                                                        const at::Tensor& tgt_img,
                                                        const at::Tensor& src_lbl,
                                                        const at::Tensor& tgt_lbl,
                                                        const at::Tensor& tgt_weight,
                                                        const at::Tensor& mix_classes) {
  const at::Device device = src_img.device();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{src_img, "src_img"},
                                {tgt_img, "tgt_img"},
                                {src_lbl, "src_lbl"},
                                {tgt_lbl, "tgt_lbl"},
                                {tgt_weight, "tgt_weight"},
                                {mix_classes, "mix_classes"}}) {
    check_cuda_contiguous(t, name, device);
  }
  TORCH_CHECK(src_img.dim() == 4, "src_img must be [B,C,H,W], got ", src_img.sizes());
  TORCH_CHECK(tgt_img.sizes() == src_img.sizes() && tgt_img.scalar_type() == src_img.scalar_type(),
              "tgt_img must match src_img in shape and dtype");
  const int64_t batch = src_img.size(0), height = src_img.size(2), width = src_img.size(3);
  const std::vector<int64_t> label_shape{batch, 1, height, width};
  TORCH_CHECK(src_lbl.sizes() == label_shape && src_lbl.scalar_type() == at::kLong,
              "src_lbl must be int64 [B,1,H,W], got ", src_lbl.scalar_type(), src_lbl.sizes());
  TORCH_CHECK(tgt_lbl.sizes() == label_shape && tgt_lbl.scalar_type() == at::kLong,
              "tgt_lbl must be int64 [B,1,H,W], got ", tgt_lbl.scalar_type(), tgt_lbl.sizes());
  TORCH_CHECK(tgt_weight.sizes() == label_shape && tgt_weight.scalar_type() == at::kFloat,
              "tgt_weight must be float32 [B,1,H,W], got ", tgt_weight.scalar_type(),
              tgt_weight.sizes());
  TORCH_CHECK(mix_classes.dim() == 2 && mix_classes.size(0) == batch && mix_classes.size(1) == 256 &&
                  mix_classes.scalar_type() == at::kBool,
              "mix_classes must be bool [B,256], got ", mix_classes.scalar_type(),
              mix_classes.sizes());
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor mixed_img = at::empty_like(src_img);
  at::Tensor mixed_lbl = at::empty_like(src_lbl);
  at::Tensor mixed_weight = at::empty_like(tgt_weight);
  C10_CUDA_CHECK(sepico_ops::classmix(
      src_img.data_ptr(), tgt_img.data_ptr(), float_type_of(src_img, "src_img"), batch,
      src_img.size(1), height, width, src_lbl.data_ptr<int64_t>(), tgt_lbl.data_ptr<int64_t>(),
      tgt_weight.data_ptr<float>(), reinterpret_cast<const uint8_t*>(mix_classes.data_ptr<bool>()),
      mixed_img.data_ptr(), mixed_lbl.data_ptr<int64_t>(), mixed_weight.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  return {mixed_img, mixed_lbl, mixed_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_label(const at::Tensor& logits,
                                                            double threshold) {
  const at::Device device = logits.device();
  check_cuda_contiguous(logits, "logits", device);
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) >= 1, "logits must be [B,C,H,W] with C >= 1, got ",
              logits.sizes());
  const c10::cuda::CUDAGuard guard(device);
  const int64_t batch = logits.size(0), height = logits.size(2), width = logits.size(3);
  at::Tensor prob = at::empty({batch, height, width}, logits.options().dtype(at::kFloat));
  at::Tensor label = at::empty({batch, height, width}, logits.options().dtype(at::kLong));
  at::Tensor q = at::empty({}, logits.options().dtype(at::kFloat));
  const size_t ws_bytes = sepico_ops::pseudo_label_workspace_bytes();
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  // The threshold is compared in fp32, as torch compares an fp32 tensor with a Python float.
  C10_CUDA_CHECK(sepico_ops::pseudo_label(
      logits.data_ptr(), float_type_of(logits, "logits"), batch, logits.size(1), height, width,
      static_cast<float>(threshold), workspace.data_ptr(), ws_bytes, prob.data_ptr<float>(),
      label.data_ptr<int64_t>(), q.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {prob, label, q};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sepico_fast, m) {
  m.def(
      "crop_window_scores(Tensor labels, Tensor offsets, int crop_h, int crop_w, int num_classes, "
      "float cat_max_ratio, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "classmix(Tensor src_img, Tensor tgt_img, Tensor src_lbl, Tensor tgt_lbl, "
      "Tensor tgt_weight, Tensor mix_classes) -> (Tensor, Tensor, Tensor)");
  m.def("pseudo_label(Tensor logits, float threshold) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sepico_fast, CUDA, m) {
  m.impl("crop_window_scores", &crop_window_scores);
  m.impl("classmix", &classmix);
  m.impl("pseudo_label", &pseudo_label);
}

// `import sepico_fast.ops._C` only needs to load the library (which runs the registrations
// above); the module itself is empty, so no pybind11 is involved.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
