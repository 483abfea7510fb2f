// meshtrain torch glue (library meshtrain_torch, CMake target meshtrain::torch): torch tensors
// as BufferViews; gradient codecs (meshtrain/compress.h) on torch tensors, on torch's current
// CUDA stream; and a torch::nn::Module with its torch::optim::Optimizer saved into a
// checkpoint::State and restored from a checkpoint, exactly enough that a resumed run continues
// bit-identically (parameters, buffers, optimizer moments and step counters, optimizer options,
// torch's RNG states).
//
// Built only when torch is found (MESHTRAIN_TORCH, README "Build options"); everything else in
// meshtrain is torch-free. This header declares the torch types it uses instead of including
// torch, so including it costs nothing; the caller's own torch headers complete them.
//
// Names in the state (docs/checkpoints.md "Torch glue"):
//   model/<name>                  a parameter or buffer, by its Module::named_parameters() /
//                                 named_buffers() name ("fc1.weight", "bn.running_mean")
//   optimizer/<param>/<field>     the optimizer's state of parameter <param> (a model/ name
//                                 without the prefix): "exp_avg", "momentum_buffer", ... and
//                                 "step" (an int64 scalar) for optimizers that count steps
//   metadata torch.optimizer, torch.optimizer.groups, torch.optimizer.group<i>.<option>,
//            torch.optimizer.group<i>.params (the group's parameter names, one per line)
//   blobs    torch.rng.cpu, torch.rng.cuda<i>
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "meshtrain/checkpoint.h"
#include "meshtrain/compress.h"
#include "meshtrain/core.h"

namespace at {
class Tensor;
}
namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace meshtrain::torch_glue {

inline constexpr std::string_view kModulePrefix = "model/";
inline constexpr std::string_view kOptimizerPrefix = "optimizer/";
inline constexpr std::string_view kCpuRngBlob = "torch.rng.cpu";

// ---------------------------------------------------------------------------------------------
// Tensors and buffers. dtypes: torch Float, Half, BFloat16, Long, Byte, Int are meshtrain
// Float32, Float16, BFloat16, Int64, UInt8, Int32; others (Double, Bool, complex, ...) are an
// InvalidArgumentError naming the tensor.

DType dtype_of(const at::Tensor& tensor, std::string_view name);

// The memory of a defined, contiguous tensor (CPU or CUDA: device and device_index say which).
// Throws InvalidArgumentError "<name>: ..." when it is undefined, not contiguous, or of an
// unsupported dtype. Borrows: valid while the tensor's storage lives and is not reallocated.
BufferView to_buffer_view(const at::Tensor& tensor, std::string_view name);

// A tensor over the view's memory (no copy; the memory must outlive the tensor and its uses).
// Throws InvalidArgumentError when the product of `shape` is not view.count.
at::Tensor from_buffer_view(const BufferView& view, std::span<const int64_t> shape);

// A checkpoint tensor of a contiguous CPU tensor (borrowed, as to_buffer_view).
checkpoint::TensorView to_tensor_view(const at::Tensor& tensor, std::string name);

// ---------------------------------------------------------------------------------------------
// CUDA streams. meshtrain's CUDA work (codec kernels, a Communicator's staging) runs on the
// stream it is given; torch's ops run on the *current* stream of their device, which the
// caller may have switched (c10::cuda::CUDAStreamGuard, torch.cuda.stream(...) in Python).
// Running on that stream orders meshtrain's work after the ops that produced a gradient and
// before the ops that read what meshtrain wrote, with no synchronisation in between.

// torch's current stream on CUDA device `device_index`, e.g. for
// collective::CommunicatorOptions::cuda_stream. InvalidArgumentError when the torch that
// meshtrain_torch was built against has no CUDA, or torch sees no such device.
compress::CudaStream current_cuda_stream(int device_index);
// The stream torch would run work on `tensor` on: its device's current stream; {} (no stream)
// for a CPU tensor.
compress::CudaStream current_stream_of(const at::Tensor& tensor);

// ---------------------------------------------------------------------------------------------
// Codecs on torch tensors: the Codec calls of meshtrain/compress.h with a tensor in place of a
// BufferView, on torch's current stream of the tensor's device. Tensors are float32 and
// contiguous, on the CPU or a CUDA device; `name` (a parameter's name) is in every error, which
// keeps its type (InvalidArgumentError for the tensor, ProtocolError / CorruptError for a bad
// payload). Each call returns when its work is done, as the Codec's do.

// The tensor's shape (PowerSGD compresses a tensor of 2 or more dimensions as
// shape[0] x the rest) and device.
compress::TensorSpec tensor_spec(const at::Tensor& tensor, std::string_view name);
// A codec state for gradients shaped and placed like `like` (once per parameter).
std::unique_ptr<compress::CodecState> make_state(const compress::Codec& codec, const at::Tensor& like,
                                                 std::string_view name);
// Encodes `grad` into `out` (at least codec.encoded_bytes(state.spec()) bytes); returns the
// bytes written. The second form returns the payload.
size_t encode(const compress::Codec& codec, const at::Tensor& grad, compress::CodecState& state,
              std::span<uint8_t> out, std::string_view name);
std::vector<uint8_t> encode(const compress::Codec& codec, const at::Tensor& grad, compress::CodecState& state,
                            std::string_view name);
// out = the decoded tensor; out += the decoded tensor (out unchanged when the payload is bad).
void decode(const compress::Codec& codec, std::span<const uint8_t> payload, const at::Tensor& out,
            std::string_view name);
void decode_accumulate(const compress::Codec& codec, std::span<const uint8_t> payload, const at::Tensor& out,
                       std::string_view name);

// ---------------------------------------------------------------------------------------------
// Saving: a snapshot of the training state at a step boundary.

struct SnapshotOptions {
  // torch's default CPU generator, and each CUDA device's default generator when CUDA is
  // available, as blobs.
  bool rng = true;
  // CPU tensors are borrowed by default: the state points into the module's and optimizer's
  // own tensors, so hand it to checkpoint::save() or CheckpointWriter::save_async() (which
  // copies it) before the next optimizer step. true copies them here instead.
  bool copy_cpu_tensors = false;
};

// Optimizers supported: SGD (momentum_buffer), Adam and AdamW (step, exp_avg, exp_avg_sq,
// max_exp_avg_sq), Adagrad (step, sum), RMSprop (step, square_avg, momentum_buffer, grad_avg);
// others (LBFGS, user optimizers) are an InvalidArgumentError naming them.
class Snapshot {
 public:
  Snapshot();
  ~Snapshot();
  Snapshot(Snapshot&&) noexcept;
  Snapshot& operator=(Snapshot&&) noexcept;

  // Add the data cursor, user metadata and other blobs here before saving.
  checkpoint::State& state() { return state_; }
  const checkpoint::State& state() const { return state_; }

 private:
  friend Snapshot snapshot(const torch::nn::Module&, const torch::optim::Optimizer*, uint64_t,
                           const SnapshotOptions&);
  checkpoint::State state_;
  struct Held;
  std::unique_ptr<Held> held_;  // host copies the state's views point into
};

// The state of `module` (parameters and buffers, recursively) and of `optimizer` (may be null;
// every parameter it optimizes must be a parameter of `module`) as of now, at `step`. CUDA
// tensors are copied into pinned host memory here (after the work queued on every stream of
// their devices, and synchronized once per device after the copies), so the
// snapshot stays valid while training continues on the GPU; non-contiguous tensors are copied.
// Throws InvalidArgumentError naming the tensor, parameter or optimizer at fault.
Snapshot snapshot(const torch::nn::Module& module, const torch::optim::Optimizer* optimizer, uint64_t step,
                  const SnapshotOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Restoring into an existing module and optimizer, built as for the saved run (same
// architecture and parameter dtypes, the same optimizer type and parameter groups).

struct RestoreOptions {
  bool rng = true;  // restore torch's generators from the blobs (when the checkpoint has them)
  // Tensors under model/ or optimizer/ that the module or optimizer has no place for are an
  // error (false: ignored, e.g. to load a checkpoint's trunk into a smaller model).
  bool strict = true;
};

// Restores from a checkpoint: every parameter and buffer of the module must be in it with the
// same dtype and shape, and the optimizer's type and groups must match. Everything is checked,
// read and verified into host memory before the module or optimizer is touched, so a failure
// (InvalidArgumentError naming the tensor: missing, wrong shape or dtype, unexpected;
// CorruptError naming the shard) leaves them as they were. The optimizer's per-parameter state
// is replaced by the checkpoint's (a parameter without state there has none afterwards) and its
// group options (lr, betas, ...) are set from the checkpoint. Tensors land on the device of the
// module's tensors. Returns the checkpoint's step.
uint64_t restore(const checkpoint::Checkpoint& checkpoint, torch::nn::Module& module,
                 torch::optim::Optimizer* optimizer, const RestoreOptions& options = {});

// The same from loaded pieces of one checkpoint: the ranges that readers 0..n-1 of n loaded
// (Checkpoint::load(r, n), gathered), one full LoadedState, or a state received from a peer
// (checkpoint::receive_state). The pieces must come from the same save and together hold every
// tensor restored (InvalidArgumentError naming a tensor no piece holds in full).
uint64_t restore(std::span<const checkpoint::LoadedState> pieces, torch::nn::Module& module,
                 torch::optim::Optimizer* optimizer, const RestoreOptions& options = {});

}  // namespace meshtrain::torch_glue
