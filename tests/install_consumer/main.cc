// Uses the installed headers and libraries as a training loop would: a simulated device, a
// pinned pool, a stream and a round trip of data, checked byte for byte; then one training
// step through a session and its executed plan. Exits non-zero on any failure.
#include <cstdio>
#include <cstring>
#include <vector>

#include "engine/session.h"
#include "runtime/base/status.h"
#include "runtime/device/backend_factory.h"
#include "runtime/device/sim/sim_backend.h"

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

// One step of a one-layer RRE model with two domains through a session.
ecss::Status TrainOneStep() {
  ecss::SimOptions sim_options;
  sim_options.device_memory_bytes = 8 << 20;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ecss::SimBackend> sim,
                        ecss::SimBackend::Create(sim_options));
  ecss::SessionOptions options;
  options.model.layers = 1;
  options.model.d_model = 8;
  options.model.d_ff = 16;
  options.model.dtype = ecss::DType::kF32;
  options.model.domains = {{"a", 2}, {"b", 2}};
  options.model.vocab = 32;
  options.budgets.device_bytes = 4 << 20;
  options.limits.max_tokens_per_micro_batch = 8;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ecss::Session> session,
                        ecss::Session::Create(*sim, options));
  const std::vector<uint32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<uint32_t> domains = {0, 1};
  ECSS_ASSIGN_OR_RETURN(ecss::Buffer x,
                        sim->device_memory().Allocate(8 * 8 * 4, ecss::MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(ecss::Buffer y,
                        sim->device_memory().Allocate(8 * 8 * 4, ecss::MemoryTag::kActivations));
  ECSS_RETURN_IF_ERROR(sim->MemsetAsync(session->compute_stream(), x.data(), 0, x.size()));
  ECSS_RETURN_IF_ERROR(session->BeginStep({{tokens.data(), 2, 4, domains.data()}}));
  ECSS_RETURN_IF_ERROR(
      session->Forward(ecss::MicroBatchIndex{0}, ecss::LayerIndex{0}, x.data(), y.data()));
  ECSS_RETURN_IF_ERROR(
      session->Backward(ecss::MicroBatchIndex{0}, ecss::LayerIndex{0}, y.data(), x.data()));
  ECSS_ASSIGN_OR_RETURN(ecss::StepStats stats, session->EndStep());
  ECSS_RETURN_IF_ERROR(session->Synchronize());
  ECSS_ASSIGN_OR_RETURN(ecss::StepPlan plan, session->ExecutedPlan(stats.step));
  if (stats.tokens != 8 || plan.Count(ecss::OpKind::kForward) != 1) {
    return ecss::InternalError("the step did not run as planned");
  }
  return ecss::Status::Ok();
}

}  // namespace

int main() {
  ecss::Status status = RoundTrip();
  if (status.ok()) status = TrainOneStep();
  std::printf("ecss consumer: %s\n", status.ToString().c_str());
  return status.ok() ? 0 : 1;
}
