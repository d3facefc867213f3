// Device: a small value naming where memory lives or work runs (host, the simulated device, a
// CUDA device), in the spirit of c10::Device. It owns nothing.
// Thread-safe (a plain value); C++17.
#pragma once

#include <cstdint>
#include <string>

namespace ecss {

enum class DeviceKind : uint8_t {
  kHost = 0,  // pageable or pinned host memory
  kSim = 1,   // the simulated device (runtime/device/sim)
  kCuda = 2,  // a CUDA device
};

struct Device {
  DeviceKind kind = DeviceKind::kHost;
  int index = 0;

  static constexpr Device Host() { return Device{DeviceKind::kHost, 0}; }
  static constexpr Device Sim(int index = 0) { return Device{DeviceKind::kSim, index}; }
  static constexpr Device Cuda(int index) { return Device{DeviceKind::kCuda, index}; }

  bool is_host() const { return kind == DeviceKind::kHost; }
  // "host", "sim:0", "cuda:1"
  std::string ToString() const;

  friend bool operator==(const Device& a, const Device& b) {
    return a.kind == b.kind && a.index == b.index;
  }
  friend bool operator!=(const Device& a, const Device& b) { return !(a == b); }
};

}  // namespace ecss
