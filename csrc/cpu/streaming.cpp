// When outputs are written with streaming stores (see streaming.h).
#include "cpu/streaming.h"

#include "fastllm.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

namespace fastllm {
namespace {

std::atomic<int64_t> streaming_threshold{-1};  // -1: automatic (set_streaming_store_threshold)

// Bytes of the level-3 cache that CPU 0 shares with its neighbours, from Linux's sysfs; 0 if unknown. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): under a hypervisor it can report the host's total (320 MiB on the 2-core
// EPYC VM this was tuned on, whose cores share one 32 MiB L3).
int64_t shared_l3_bytes() {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;  // e.g. "32768K"
    if (!(level_file >> level) || !(size_file >> size)) break;
    if (level != 3 || size.empty()) continue;
    const int64_t unit = size.back() == 'K' ? 1 << 10 : size.back() == 'M' ? 1 << 20 : 1;
    return std::atoll(size.c_str()) * unit;
  }
  return 0;
}

// Whether the memory page holding `address` is already mapped in (mincore).
bool page_resident(const void* address) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char resident = 0;
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(address) & ~(page - 1));
  return mincore(start, 1, &resident) == 0 && (resident & 1);
}

}  // namespace

bool streaming_output(const torch::Tensor& out) {
  if (!kHasStreamingStores) return false;
  static const int64_t automatic = [] {
    int64_t l3 = shared_l3_bytes();
    if (l3 <= 0) l3 = static_cast<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE));
    return l3 > 0 ? l3 * 3 / 4 : int64_t(24) << 20;
  }();
  const int64_t threshold = streaming_threshold.load(std::memory_order_relaxed);
  const int64_t bytes = static_cast<int64_t>(out.nbytes());
  if (bytes == 0 || bytes < (threshold < 0 ? automatic : threshold)) return false;
  const auto* first = static_cast<const char*>(out.data_ptr());
  return page_resident(first) && page_resident(first + bytes - 1);
}

int64_t set_streaming_store_threshold(int64_t bytes) {
  TORCH_CHECK(bytes >= -1, "set_streaming_store_threshold: bytes must be >= 0, or -1 for automatic, got ", bytes);
  return streaming_threshold.exchange(bytes);
}

}  // namespace fastllm
