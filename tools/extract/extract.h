// ecss-extract's library: a domain's sub-model cut out of a session's checkpoint, as a
// safetensors file (tools/extract/safetensors.h) or as a checkpoint the library loads; and
// model surgery on checkpoints (AddDomain, RepeatLayers); and such a file imported back
// (ImportSafetensors).
// PanGu-Sigma's promise: every sparse layer keeps only the chosen domains' expert groups,
// renumbered, with routing tables rewritten to the new numbers, so the sub-model routes every token
// of those domains to the very expert, with the very weights, that the full model does.
//
// The file's tensors (layer l, expert j of the extracted layer: the kept domains' groups in
// the full model's domain order, each group in its own order):
//   layers.{l}.experts.{j}.w_in    F32 [d_model, d_in]  fp32 master weights (d_in = d_ff, or
//                                                        2 d_ff for SwiGLU: gate | up columns)
//   layers.{l}.experts.{j}.w_out   F32 [d_ff, d_model]
//   with_optimizer_state, per w_in and w_out: .exp_avg and .exp_avg_sq (Adam, AdamW), .exp_avg
//   (Lion), .sum (Adagrad), .momentum_buffer (SGD with momentum), F32 of the same shape,
//   and layers.{l}.updates I64 [experts]: each expert's update count (Adam's bias correction).
//   layers.{l}.routing             I32 [domains, vocab]  row d: the extracted expert each token
//                                                        id of kept domain d goes to
// __metadata__: format "ecss-extract 1", the sub-model ("model": the checkpoint's model
// record with only the kept domains), the kept domains in row order, the source checkpoint
// and the optimizer kind. The bf16 compute weights a bf16 model runs with are the master
// weights rounded to nearest even. Experts never written hold their initial values, drawn as
// the session draws them.
//
// Streaming: one expert's states in memory at a time, so an extraction larger than memory
// works. Thread-compatible.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/session_options.h"
#include "runtime/base/status.h"

namespace ecss {

struct ExtractOptions {
  std::string checkpoint;            // ROOT/NAME, as Session::SaveCheckpoint wrote it
  std::vector<std::string> domains;  // the names to keep (any order; at least one)
  std::string out;                   // the safetensors file
  bool with_optimizer_state = false;
  bool overwrite = false;  // replace `out` if it exists (else AlreadyExists)
  // Reads the written file back through its header and checks every tensor bit for bit
  // against the checkpoint (each expert read again, CRC-verified) and the full model's routes.
  bool verify = false;
  // After each expert written (and again while verifying): done of total.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct ExtractReport {
  ModelSpec model;          // the sub-model (the kept domains, in the full model's order)
  uint64_t experts = 0;     // extracted, every layer
  uint64_t initial = 0;     // of them never written (their initial values)
  uint64_t tensors = 0;     // safetensors
  uint64_t file_bytes = 0;  // safetensors: header and data; ecss: the checkpoint's bytes
  bool verified = false;
};

// The same sub-model as a checkpoint the library loads (--format ecss): `out` is ROOT/NAME of
// a checkpoint (offload/checkpoint.h) whose model record is the sub-model's, with the kept
// domains' ids (so tokens route as in the full model, and micro-batches name domains by the
// same ids) and their experts' initial values' keys (so experts never written stay what they
// were: they stay unwritten). A session created with that model (ExtractReport::model) and
// placement.resume_from = `out` trains or evaluates it; the loop's blobs are copied.
// --verify runs the full and the extracted model through the session's evaluation step on the
// same held-out inputs of the kept domains and requires every sparse layer's outputs to be
// bit-identical (both models are restored with their states in host memory for it). A
// failure removes the new checkpoint. Errors as ExtractToSafetensors'; `overwrite` deletes an
// existing checkpoint `out` first.
StatusOr<ExtractReport> ExtractToCheckpoint(const ExtractOptions& options);

// Model surgery: a domain added to a checkpoint's model, as a new checkpoint `out`. The new
// group starts either
//  - as a copy of domain `copy_of`'s group (as many experts), each with its weights, moments
//    and update count (one never updated stays unwritten, drawn as its source was); or
//  - from a dense FFN's weights, as PanGu-Sigma grew from PanGu-alpha: `experts` experts per
//    layer, each with the FFN of its layer as master weights, zero moments and no update yet
//    (written at version 0: its first update is its optimizer's first step). `dense_ffn` is a
//    safetensors file holding, for every sparse layer l, `layers.{l}.w_in` F32 [d_model, d_in]
//    and `layers.{l}.w_out` F32 [d_ff, d_model] (d_in = d_ff, or 2 d_ff for SwiGLU: gate
//    columns, then up), the layout ecss-extract writes experts in; other tensors are ignored.
//    A missing or misdeclared tensor is DataLoss naming it, and so is a non-finite value.
// The new group goes after every existing group, with a new id (one above the highest), so no
// other expert moves and no other domain's routes change: every old domain computes bit for
// bit as before. The new domain's tokens route by tables of its own (RRE tables are keyed on
// the domain's id). `verify` runs the evaluation step of the old and the new model on the same
// inputs of the old domains and requires bit-identical outputs, and compares every expert of
// `out` with its source (an old expert, or the FFN).
struct AddDomainOptions {
  std::string checkpoint;  // ROOT/NAME
  std::string name;        // the new domain's (AlreadyExists if the model has it)
  std::string copy_of;     // an existing domain (NotFound listing them otherwise), or
  std::string dense_ffn;   // the dense FFN's safetensors file (exactly one of the two)
  uint32_t experts = 0;    // with dense_ffn: the new group's experts per layer (at least 1)
  std::string out;         // ROOT/NAME of the new checkpoint (AlreadyExists unless overwrite)
  bool overwrite = false;
  bool verify = false;
};
StatusOr<ExtractReport> AddDomain(const AddDomainOptions& options);

// Model surgery, M6's Pseudo-to-Real: a deep model grown from a shallow one, as checkpoint
// `out` of a model of `times` x the layers whose layer l starts as the shallow model's layer
// l % layers. No expert is copied: each deeper copy shares its shallow source's storage, so
// the checkpoint stores it once (a bf16 model's; an f32 model's copies are stored each) and a
// session restores it without writing it; each copy becomes its own at its first update
// (delinking), leaving the others as they were. Experts never written stay unwritten and draw
// as their shallow layer's did (ModelSpec::initial_layers). The loop's blobs and the
// session's records are kept (the deep model's dense part is the loop's to grow). `verify`
// compares every expert of `out` with its source, version and bytes. Errors as
// ExtractToCheckpoint's; InvalidArgument for times < 2.
struct RepeatLayersOptions {
  std::string checkpoint;  // ROOT/NAME of the shallow model
  uint32_t times = 0;
  std::string out;  // ROOT/NAME of the deep model's checkpoint
  bool overwrite = false;
  bool verify = false;
};
StatusOr<ExtractReport> RepeatLayers(const RepeatLayersOptions& options);

// A safetensors file ecss-extract wrote with the optimizer's state, imported back as a
// checkpoint ROOT/NAME (`out`) of the model its metadata records, which a session resumes
// (placement.resume_from) bit for bit as from the checkpoint it was extracted from: each
// expert's master weights, moments and update count (its version). The file is checked as
// strictly as it was written: its format, model record and optimizer; every tensor the model
// implies present with its dtype and shape, and no other; each layer's routing table the
// model's router's; an expert never updated (count 0) holding exactly its initial values
// (it stays unwritten, and reads as them), unless the metadata's written_without_update
// names it (a group grown from a dense FFN: written at version 0). The checkpoint holds no loop
// state and no session record (the file has neither): a resumed session starts its step count at 0
// with the hyper-parameters of its options. `verify` reads every expert of the checkpoint back and
// compares it with the file. FailedPrecondition for a file without the optimizer's state or
// not written by ecss-extract; DataLoss naming the tensor for a damaged one; AlreadyExists
// for an existing `out` unless `overwrite`; the output places ExtractToCheckpoint refuses.
struct ImportOptions {
  std::string file;  // the safetensors file
  std::string out;   // ROOT/NAME of the checkpoint
  bool overwrite = false;
  bool verify = false;
  std::function<void(uint64_t done, uint64_t total)> progress;  // after each expert
};
StatusOr<ExtractReport> ImportSafetensors(const ImportOptions& options);

// NotFound for a checkpoint or domain that does not exist (listing those that do);
// FailedPrecondition for a checkpoint without the model record (saved before it existed);
// DataLoss for a damaged checkpoint (naming the file, layer, expert and state).
StatusOr<ExtractReport> ExtractToSafetensors(const ExtractOptions& options);

}  // namespace ecss
