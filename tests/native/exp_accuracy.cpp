// The decode attention's vector exp (exp_avx2, csrc/decode_attention.cpp, included here for its internal linkage)
// against the correctly rounded e^x (libm's double exp, rounded once to fp32) at every 5th float of [-87.3, 0]
// (224M of them), and at the edges: prints the worst error in ulps and "exp accuracy: ok" when it is at most 1.
#include "../../csrc/decode_attention.cpp"

#include <cstdio>
#include <cstdlib>

namespace {

int64_t ulps(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::llabs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

__attribute__((target("avx2,fma"))) void exp8(const float* in, float* out) {
  _mm256_storeu_ps(out, pllava::exp_avx2(_mm256_loadu_ps(in)));
}

}  // namespace

int main() {
  int64_t worst = 0, n = 0;
  float at = 0.f, in[8], out[8];
  int k = 0;
  for (uint32_t b = 0x80000000u;; b += 5) {  // -0, then ever more negative floats
    float f;
    std::memcpy(&f, &b, 4);
    if (f < -87.3f) break;
    in[k++] = f;
    if (k < 8) continue;
    exp8(in, out);
    for (int i = 0; i < 8; ++i, ++n) {
      const int64_t e = ulps(out[i], static_cast<float>(std::exp(static_cast<double>(in[i]))));
      if (e > worst) worst = e, at = in[i];
    }
    k = 0;
  }
  const float edge[8] = {NAN, -INFINITY, -88.f, -100.f, 0.f, -1e-30f, -87.3f, -1e-45f};
  exp8(edge, out);
  const bool edges = std::isnan(out[0]) && out[1] == 0.f && out[2] == 0.f && out[3] == 0.f && out[4] == 1.f &&
                     out[5] == 1.f && ulps(out[6], std::exp(-87.3f)) <= 1 && out[7] == 1.f;
  std::printf("%ld floats: worst %ld ulp (at %.9g); edges %s\n", static_cast<long>(n), static_cast<long>(worst), at,
              edges ? "right" : "WRONG");
  if (worst <= 1 && edges) std::printf("exp accuracy: ok\n");
  return worst <= 1 && edges ? 0 : 1;
}
