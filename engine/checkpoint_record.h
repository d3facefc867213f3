// What a session records about itself in a checkpoint, besides the experts' states: blobs whose
// names start with "ecss." (the loop's may not), read back at resume and by ecss-extract.
//   ecss.optimizer  the optimizer kind whose moments the checkpoint holds ("adamw", ...)
//   ecss.model      the model (FormatModelRecord): what the expert ids, sizes and initial
//                   values mean, so a resume with another model is refused naming the field,
//                   and a tool can read the checkpoint without the loop's options
//   ecss.session    the session at the step boundary (FormatSessionRecord): steps begun,
//                   hyper-parameters in force, and the delayed update's held experts
//   ecss.held_gradients
//                   those experts' gradient accumulators, in the record's order, each
//                   ModelSpec::expert_params() values of the record's gradient dtype
// Also the experts' initial values (DrawInitialMaster), which the store reproduces for
// experts never written, and so must a reader of a checkpoint, which records them as initial.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/session_options.h"
#include "offload/checkpoint.h"
#include "offload/expert_index.h"
#include "runtime/base/status.h"

namespace ecss {

inline constexpr std::string_view kSessionBlobPrefix = "ecss.";
inline constexpr std::string_view kOptimizerBlob = "ecss.optimizer";
inline constexpr std::string_view kModelBlob = "ecss.model";
inline constexpr std::string_view kSessionBlob = "ecss.session";
inline constexpr std::string_view kHeldGradientsBlob = "ecss.held_gradients";

// What a session is at a step boundary besides its experts' states: what a resume restores
// so that training goes on as if never stopped.
struct SessionRecord {
  uint64_t steps = 0;        // steps begun (evaluations included): the next is steps + 1
  HyperParams hyper_params;  // in force for the updates the next steps start
  // Delayed update: the experts whose gradients of the last step are held for the next
  // BeginStep's update (in submission order), the loss scale those gradients carry, and the
  // dtype of their accumulators (SessionOptions::gradient_dtype).
  std::vector<ExpertId> held;
  float held_loss_scale = 1;
  DType gradient_dtype = DType::kF32;
};
// One "key value" line per field (floats as their bit patterns, "held LAYER EXPERT" per held
// expert, in order).
std::string FormatSessionRecord(const SessionRecord& record);
// The inverse, strict as ParseModelRecord.
StatusOr<SessionRecord> ParseSessionRecord(std::string_view text);
// One held expert's gradient bytes: expert_params of the record's gradient dtype.
uint64_t HeldGradientBytes(const SessionRecord& record, const ModelSpec& model);

// A checkpoint's session record with the held gradients it names.
struct SessionState {
  SessionRecord record;
  std::string held_gradients;  // record.held.size() x HeldGradientBytes, in record.held's order
};
// The session state `blobs` hold, if any (checkpoints of builds before the record hold none).
// DataLoss for a damaged record, or held gradients not of its size (or without a record).
StatusOr<std::optional<SessionState>> SessionStateOf(const std::vector<CheckpointBlob>& blobs,
                                                     const ModelSpec& model);

// SessionOptions::Validate's rules for the model alone (InvalidArgument naming the field).
Status ValidateModel(const ModelSpec& model);

// Every ModelSpec field, one "key value" line each ("domain EXPERTS ID KEY NAME" per domain,
// in order, with its id and its initial values' key resolved; init_scale as its bit pattern,
// so it reads back exactly; initial_layers only when not 0, as records before it had none).
// REQUIRES: model.Validate'd (domain names hold no line break: Validate refuses them).
std::string FormatModelRecord(const ModelSpec& model);
// The inverse, strict: DataLoss naming the line for anything FormatModelRecord does not write
// (an unknown or repeated key, a bad number, a missing field).
StatusOr<ModelSpec> ParseModelRecord(std::string_view text);
// OK when `saved` and `here` are the same model; else FailedPrecondition naming the first field
// that differs and both values.
Status CheckSameModel(const ModelSpec& saved, const ModelSpec& here);

// The model checkpoint ROOT/NAME was saved from (its ecss.model record): what a session that
// resumes it (placement.resume_from) is created with, e.g. a sub-model ecss-extract wrote.
// NotFound for no checkpoint there; FailedPrecondition for a checkpoint saved before the
// record; DataLoss for a damaged one.
StatusOr<ModelSpec> CheckpointModel(const std::string& checkpoint);
// The same, of a checkpoint being read.
StatusOr<ModelSpec> CheckpointModel(const CheckpointReader& reader);

// Whether a checkpoint with these blobs resumes into a session with these options: its
// optimizer kind and model (when recorded: checkpoints of builds before a record lack it) are
// the session's; its hyper-parameters are valid for that optimizer; held gradients need
// delayed_update and the same gradient_dtype, and name experts of the model, their blob of
// exactly their size. FailedPrecondition naming what differs; DataLoss for a damaged record.
// Returns the session state to resume (SessionStateOf).
StatusOr<std::optional<SessionState>> CheckSessionRecords(const std::vector<CheckpointBlob>& blobs,
                                                          const SessionOptions& options);

// What the store's unwritten experts read as (ExpertStoreOptions::initial_id), in words: a
// checkpoint records it, and a reader that draws them (DrawInitialMaster) checks it.
std::string InitialValuesId(const ModelSpec& model);

// Expert (layer, expert)'s initial fp32 master weights (ModelSpec::expert_params of them),
// from the counter-based stream of (ModelSpec::InitialLayer(layer),
// ModelSpec::InitialKey(expert)): W_in ~ U(-s, s) with s = init_scale or 1/sqrt(d_model), then
// W_out with init_scale or 1/sqrt(d_ff). The same on every platform and build.
void DrawInitialMaster(const ModelSpec& model, uint32_t layer, uint32_t expert, float* master);

}  // namespace ecss
