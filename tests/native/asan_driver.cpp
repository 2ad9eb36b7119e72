// Runs the native preprocessing core under AddressSanitizer/UBSan on awkward shapes and strides: every read must
// stay inside the input, every write inside the output (built and run by tests/test_preprocess.py).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/preprocess.h"

int main() {
  const int sizes[][2] = {{720, 1280}, {1, 1}, {2, 3}, {200, 300}, {336, 336}, {337, 5}, {5, 900}, {1081, 1919}};
  unsigned seed = 1;
  for (auto& hw : sizes) {
    for (int flip = 0; flip < 2; ++flip) {
      const int t = flip ? 1 : 2, h = hw[0], w = hw[1];  // T=1 < 2 threads: the row-parallel path
      std::vector<uint8_t> buf(static_cast<size_t>(t) * h * w * 3);
      for (auto& b : buf) b = static_cast<uint8_t>(seed = seed * 1103515245u + 12345u);
      pllava::Frames f{buf.data(), t, h, w, int64_t(h) * w * 3, int64_t(w) * 3, 3, 1};
      if (flip) {  // a vertically flipped view: negative row stride from the last row
        f.data = buf.data() + int64_t(h - 1) * w * 3;
        f.sh = -int64_t(w) * 3;
      }
      for (int se : {336, 7, 1}) {
        pllava::Params p;
        p.shortest_edge = se;
        int nh, nw;
        pllava::resize_params(p, h, w, &nh, &nw);
        p.crop_h = std::min(se, nh);
        p.crop_w = std::min(se, nw);
        for (int dt = 0; dt < 3; ++dt) {
          const size_t n = size_t(t) * 3 * p.crop_h * p.crop_w;
          std::vector<uint8_t> out(n * (dt == 0 ? 4 : 2));
          pllava::preprocess(f, p, out.data(), static_cast<pllava::OutDtype>(dt), 2);
        }
      }
    }
  }
  std::puts("asan driver: ok");
  return 0;
}
