// Native CLIP preprocessing (see preprocess.cpp).
#pragma once
#include <cstdint>

namespace pllava {

struct Frames {  // uint8 RGB frames (T, H, W, 3) with arbitrary (signed) strides, in elements (= bytes)
  const uint8_t* data;
  int64_t t, h, w;
  int64_t st, sh, sw, sc;
};

struct Params {
  bool do_resize = true;
  int shortest_edge = 336;
  int crop_h = 336, crop_w = 336;  // do_center_crop = false is mapped to crop = resized size by the caller
  bool do_rescale = true;
  double rescale = 1.0 / 255.0;
  bool do_normalize = true;
  double mean[3] = {0.48145466, 0.4578275, 0.40821073};
  double std[3] = {0.26862954, 0.26130258, 0.27577711};
};

enum class OutDtype { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Output size of the resize for an h x w frame.
void resize_params(const Params& p, int h, int w, int* nh, int* nw);

// Writes (T, 3, crop_h, crop_w) contiguous into `out` (caller-allocated, of `dtype`). Throws std::invalid_argument.
void preprocess(const Frames& in, const Params& p, void* out, OutDtype dtype, int num_threads);

}  // namespace pllava
