// StepStats: what Session::EndStep reports of a step (engine/session.h): its time and
// tokens, the bytes each direction and tier moved, the cache's hits, the stalls by cause, each
// resource's busy and exposed time with the step's bound ratio and overlap fraction, and the
// optimizer's report. A plain value.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/step_metrics.h"
#include "offload/stall_record.h"
#include "optimizer/cpu_optimizer.h"

namespace ecss {

// Time the driving thread waited, by cause.
struct StallStats {
  double update_fence_seconds = 0;   // a fetch waited for the expert's previous update
  double gradient_copy_seconds = 0;  // waiting for gradients to reach host memory
  double stage_sync_seconds = 0;     // no-overlap / naive: a stage waiting for the previous
  double optimizer_seconds = 0;      // no-overlap / naive: EndStep waiting for the updates
  // ecss: BeginStep waiting for the step before last's updates (one step of overlap at most,
  // so that a slower optimizer shows in the step time instead of a growing backlog)
  double update_backlog_seconds = 0;
  double total() const {
    return update_fence_seconds + gradient_copy_seconds + stage_sync_seconds + optimizer_seconds +
           update_backlog_seconds;
  }
};

struct StepStats {
  uint64_t step = 0;
  uint64_t tokens = 0;
  double seconds = 0;  // since the previous EndStep returned (the first: since BeginStep)
  // Of them, BeginStep's own work before the step issued anything: routing its micro-batches
  // and building its plan, on the driving thread (what ecss-plan models as a step's begin).
  double begin_seconds = 0;
  double tokens_per_s = 0;
  uint64_t h2d_bytes = 0;  // every host-to-device byte of the backend in this step
  uint64_t d2h_bytes = 0;
  uint64_t expert_fetch_bytes = 0;  // of which expert weights
  uint64_t gradient_bytes = 0;      // of which expert gradients
  // NVMe: what the placement implies (each update reads and writes master and moments, and
  // writes the bf16 weights when they live on NVMe; each fetch of NVMe weights reads them)...
  uint64_t nvme_bytes = 0;
  // ... and what the store's I/O engines read and wrote (headers and 4 KiB padding too). An
  // update that runs on into the next step counts in the step it ran in.
  uint64_t nvme_read_bytes = 0, nvme_written_bytes = 0;
  // Of nvme_written_bytes, what went into slots never stored before (a new store's first
  // writes, which the file system allocates as it goes: ExpertStore::IoBytes::fresh_written).
  uint64_t nvme_fresh_written_bytes = 0;
  uint64_t cache_hits = 0, cache_misses = 0;
  double hit_rate = 0;
  StallStats stalls;
  std::vector<StallRecord> stall_records;  // every fetch that waited: who, on what, how long
  double stall_fraction = 0;               // stalls.total() / seconds
  // Busy seconds of each resource in this step, as its counters advanced (the optimizer's:
  // the time in which at least one of its threads ran an update, as an interval that ended).
  double compute_busy_seconds = 0, h2d_busy_seconds = 0, d2h_busy_seconds = 0;
  double optimizer_busy_seconds = 0;
  // How the step used its resources, from when each was busy within it (engine/step_metrics.h):
  // busy and exposed time per resource, bound_ratio, overlap_fraction. The device engines are
  // listed where the backend keeps their times (the sim; not CUDA); the optimizer always.
  StepMetrics metrics;
  uint32_t updated_experts = 0;
  uint64_t updated_params = 0;
  StepReport optimizer;  // norm, clipping, skipped
};

}  // namespace ecss
