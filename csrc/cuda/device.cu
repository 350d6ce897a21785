// device.cu: what pyreg's CUDA build reports about itself and the devices:
// the architectures it was built for, the device count, and whether its
// kernels can run on a device (device_error also loads every kernel's module,
// each family listing its kernels: elementwise_kernels(), group_kernels(),
// optim_kernels(), select_kernels()).
#include "kernels.h"

#if !defined(PYREG_CUDA_EMU)  // the emulator's stand-in is already included
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <string>
#include <vector>

#include "launch.h"

// CMake passes the architectures (comma-separated) to this file only.
#ifndef PYREG_CUDA_ARCHS
#define PYREG_CUDA_ARCHS ""
#endif

namespace pyreg {
namespace PYREG_CUDA_NS {

std::string archs() {
  // CMake's list ("80-real,90-real,90-virtual", ',' for ';') -> "sm_80 sm_90 compute_90".
  const std::string spec = PYREG_CUDA_ARCHS;
  std::string out;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t end = spec.find_first_of(",; ", pos);
    if (end == std::string::npos) end = spec.size();
    const std::string a = spec.substr(pos, end - pos);
    pos = end + 1;
    if (a.empty()) continue;
    auto add = [&](const std::string& s) { out += (out.empty() ? "" : " ") + s; };
    const size_t dash = a.find('-');
    const std::string num = a.substr(0, dash);
    const bool numeric = !num.empty() && num[0] >= '0' && num[0] <= '9';
    if (!numeric) add(a);
    else if (dash == std::string::npos) { add("sm_" + num); add("compute_" + num); }
    else if (a.substr(dash + 1) == "real") add("sm_" + num);
    else if (a.substr(dash + 1) == "virtual") add("compute_" + num);
    else add(a);
  }
  return out;
}

int64_t param_bytes() { return int64_t(kParamBytes); }

namespace {
std::atomic<int64_t> g_launches{0};
}  // namespace

void count_launch() { g_launches.fetch_add(1, std::memory_order_relaxed); }
int64_t launch_count() { return g_launches.load(std::memory_order_relaxed); }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string runtime_error() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  if (n == 0) return "no CUDA device found";
  return "";
}

std::string device_error(int device) {
  const std::string rt = runtime_error();
  if (!rt.empty()) return rt;
  int n = 0;
  (void)cudaGetDeviceCount(&n);
  if (device < 0 || device >= n)
    return "no CUDA device " + std::to_string(device) + " (" + std::to_string(n) + " found)";
#if !defined(PYREG_CUDA_EMU)
  if (kParamBytes > 4096) {  // CUDA 12.1's large kernel parameters need its driver
    int driver = 0;
    (void)cudaDriverGetVersion(&driver);
    (void)cudaGetLastError();
    if (driver < 12010)
      return "pyreg's CUDA kernels were built to take up to " + std::to_string(kParamBytes) +
             " bytes of kernel arguments (CUDA 12.1), which this driver (CUDA " + std::to_string(driver / 1000) +
             "." + std::to_string(driver % 1000 / 10) + ") does not support: update the driver (R530 or "
             "newer), or build pyreg with the CMake option PYREG_CUDA_SMALL_PARAMS=ON";
  }
#endif
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    const cudaError_t e = cudaGetLastError();
    return std::string("cannot use device ") + std::to_string(device) + ": " + cudaGetErrorName(e);
  }
  std::vector<KernelRef> kernels = elementwise_kernels();
  for (const std::vector<KernelRef>& more : {group_kernels(), optim_kernels(), select_kernels()})
    kernels.insert(kernels.end(), more.begin(), more.end());
  std::string err;
  for (const KernelRef& k : kernels) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, k.fn);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      cudaDeviceProp prop;
      const bool have = cudaGetDeviceProperties(&prop, device) == cudaSuccess;
      (void)cudaGetLastError();
      err = std::string(k.name) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") on " +
            (have ? std::string(prop.name) + ", compute capability " + std::to_string(prop.major) +
                        "." + std::to_string(prop.minor)
                  : "device " + std::to_string(device)) +
            "; pyreg's kernels are built for " + archs() + " (set the CMake option PYREG_CUDA_ARCHS when building)";
      break;
    }
  }
  (void)cudaSetDevice(prev);
  return err;
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
