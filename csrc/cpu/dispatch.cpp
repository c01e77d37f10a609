// Run-time choice of the instruction set, and per-thread scratch buffers.
//
// The build is portable (no -march=native): each ISA's kernels are compiled
// with target attributes, and the best one the CPU and the OS support is
// picked here once.  STEERKERN_CPU_ISA=portable|avx2|avx512|avx512bf16 caps
// the choice.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace steerkern {
namespace cpu {
namespace {

enum Level { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

int hardware_level() {
#ifdef STEERKERN_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider registers
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  return bf16 ? kAvx512Bf16 : avx512 ? kAvx512 : avx2 ? kAvx2 : kPortable;
#else
  return kPortable;
#endif
}

int parse_level(const char* name) {
  if (name == nullptr || *name == '\0' || std::strcmp(name, "auto") == 0) return kAvx512Bf16;
  if (std::strcmp(name, "portable") == 0) return kPortable;
  if (std::strcmp(name, "avx2") == 0 || std::strcmp(name, "avx2+fma") == 0) return kAvx2;
  if (std::strcmp(name, "avx512") == 0) return kAvx512;
  if (std::strcmp(name, "avx512bf16") == 0) return kAvx512Bf16;
  return -1;
}

const Kernels* table_for(int level) {
#ifdef STEERKERN_X86
  if (level >= kAvx512Bf16) return &kAvx512Bf16Kernels;
  if (level >= kAvx512) return &kAvx512Kernels;
  if (level >= kAvx2) return &kAvx2Kernels;
#endif
  return &kPortableKernels;
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> chosen{[] {
    int cap = parse_level(std::getenv("STEERKERN_CPU_ISA"));
    if (cap < 0) cap = kAvx512Bf16;  // an unknown value is ignored, as if unset
    return table_for(std::min(cap, hardware_level()));
  }()};
  return chosen;
}

}  // namespace

const Kernels& kernels() { return *current().load(std::memory_order_relaxed); }

const char* capability() { return kernels().name; }

const char* set_capability(const char* name) {
  const int cap = parse_level(name);
  if (cap < 0) return nullptr;
  current().store(table_for(std::min(cap, hardware_level())));
  return capability();
}

float* scratch(int64_t n, int slot) {
  thread_local std::vector<float> buffers[kScratchSlots];
  std::vector<float>& b = buffers[slot];
  if (int64_t(b.size()) < n) b.resize(size_t(n));
  return b.data();
}

}  // namespace cpu
}  // namespace steerkern
