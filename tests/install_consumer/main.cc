// Uses the installed headers and libraries: a simulated device, a pinned pool, a stream and a
// round trip of data, checked byte for byte. Exits non-zero on any failure.
#include <cstdio>
#include <cstring>
#include <vector>

#include "runtime/base/status.h"
#include "runtime/device/backend_factory.h"

namespace {

ecss::Status RoundTrip() {
  ecss::BackendOptions options;
  options.sim.device_memory_bytes = 1 << 20;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ecss::Backend> backend, ecss::CreateBackend(options));
  ecss::PinnedPoolOptions pool_options;
  pool_options.capacity_bytes = 1 << 20;
  ECSS_ASSIGN_OR_RETURN(auto pool, backend->CreatePinnedPool(pool_options));
  ECSS_ASSIGN_OR_RETURN(ecss::Buffer host, pool->Allocate(4096, ecss::MemoryTag::kStaging));
  ECSS_ASSIGN_OR_RETURN(ecss::Buffer device,
                        backend->device_memory().Allocate(4096, ecss::MemoryTag::kOther));
  ECSS_ASSIGN_OR_RETURN(ecss::OwnedStream stream, ecss::CreateOwnedStream(*backend, "consumer"));
  std::memset(host.data(), 0x3c, 4096);
  std::vector<unsigned char> back(4096, 0);
  ECSS_RETURN_IF_ERROR(backend->CopyAsync(stream.get(), device.data(), host.data(), 4096,
                                          ecss::CopyKind::kHostToDevice));
  ECSS_RETURN_IF_ERROR(backend->CopyAsync(stream.get(), back.data(), device.data(), 4096,
                                          ecss::CopyKind::kDeviceToHost));
  ECSS_RETURN_IF_ERROR(backend->SynchronizeStream(stream.get()));
  for (unsigned char byte : back) {
    if (byte != 0x3c) return ecss::InternalError("round trip corrupted data");
  }
  return ecss::Status::Ok();
}

}  // namespace

int main() {
  ecss::Status status = RoundTrip();
  std::printf("ecss consumer: %s\n", status.ToString().c_str());
  return status.ok() ? 0 : 1;
}
