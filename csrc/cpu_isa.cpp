// The CPU kernels' instruction set, decided once from cpuid (see cpu_isa.h).
#include "cpu_isa.h"

#include <atomic>
#include <cstring>

namespace pllava {
namespace {
std::atomic<int> g_cap{static_cast<int>(Isa::kAvx512)};
}  // namespace

Isa cpu_isa_supported() {
  static const Isa best = __builtin_cpu_supports("avx512f")                                   ? Isa::kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                              : Isa::kGeneric;
  return best;
}

Isa cpu_isa() {
  const int cap = g_cap.load(std::memory_order_relaxed);
  const int best = static_cast<int>(cpu_isa_supported());
  return static_cast<Isa>(best < cap ? best : cap);
}

bool set_isa_cap(const char* name) {
  Isa cap;
  if (std::strcmp(name, "") == 0 || std::strcmp(name, "best") == 0 || std::strcmp(name, "avx512") == 0)
    cap = Isa::kAvx512;
  else if (std::strcmp(name, "avx2") == 0)
    cap = Isa::kAvx2;
  else if (std::strcmp(name, "generic") == 0)
    cap = Isa::kGeneric;
  else
    return false;
  g_cap.store(static_cast<int>(cap), std::memory_order_relaxed);
  return true;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace pllava
