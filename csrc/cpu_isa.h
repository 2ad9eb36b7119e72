// Which vector instruction set the CPU kernels (int8_gemv.cpp, decode_attention.cpp) run with.
#pragma once

namespace pllava {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The best this CPU runs (AVX-512F; else AVX2 with FMA; else the portable loops), lowered to the cap when one is
// set (tests and benchmarks run the AVX2 path on an AVX-512 CPU that way).
Isa cpu_isa();
// The most this CPU supports, whatever the cap.
Isa cpu_isa_supported();
// Caps cpu_isa() at "avx512", "avx2" or "generic" ("" or "best": no cap). False for another name.
bool set_isa_cap(const char* name);
const char* isa_name(Isa isa);

}  // namespace pllava
