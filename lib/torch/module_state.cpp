// A module and its optimizer as a checkpoint state (snapshot) and back (restore).
#include <ATen/ATen.h>
#include <torch/cuda.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/version.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>

#include "internal.h"
#include "meshtrain/torch.h"

namespace meshtrain::torch_glue {
namespace {

using internal::OptimizerAdapter;

constexpr std::string_view kOptimizerKey = "torch.optimizer";
constexpr std::string_view kGroupsKey = "torch.optimizer.groups";
constexpr std::string_view kCudaRngBlobPrefix = "torch.rng.cuda";

std::string group_key(size_t group, std::string_view what) { return fmt::format("torch.optimizer.group{}.{}", group, what); }
std::string optimizer_tensor_name(std::string_view param, std::string_view field) {
  return fmt::format("{}{}/{}", kOptimizerPrefix, param, field);
}

std::string shape_string(at::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }
std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

struct NamedTensor {
  std::string name;  // with the model/ prefix
  at::Tensor tensor;
};

std::vector<NamedTensor> module_tensors(const torch::nn::Module& module) {
  std::vector<NamedTensor> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true))
    out.push_back({std::string(kModulePrefix) + item.key(), item.value()});
  for (const auto& item : module.named_buffers(/*recurse=*/true))
    if (item.value().defined()) out.push_back({std::string(kModulePrefix) + item.key(), item.value()});
  return out;
}

// Each optimized parameter's name in the module (without the prefix).
std::vector<std::vector<std::string>> group_parameter_names(const torch::nn::Module& module,
                                                           const torch::optim::Optimizer& optimizer) {
  std::unordered_map<const c10::TensorImpl*, std::string> names;
  for (const auto& item : module.named_parameters(true)) names.emplace(item.value().unsafeGetTensorImpl(), item.key());
  std::vector<std::vector<std::string>> groups;
  const auto& param_groups = optimizer.param_groups();
  for (size_t g = 0; g < param_groups.size(); ++g) {
    auto& group = groups.emplace_back();
    const auto& params = param_groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = names.find(params[i].unsafeGetTensorImpl());
      if (it == names.end())
        throw InvalidArgumentError(fmt::format("optimizer parameter group {} parameter {} (shape {}) is not a parameter of "
                                               "the module",
                                               g, i, shape_string(params[i].sizes())));
      group.push_back(it->second);
    }
  }
  return groups;
}

std::string join_lines(const std::vector<std::string>& names) { return fmt::format("{}", fmt::join(names, "\n")); }

std::vector<uint8_t> tensor_bytes(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  const auto* p = static_cast<const uint8_t*>(c.data_ptr());
  return std::vector<uint8_t>(p, p + c.nbytes());
}

// ---------------------------------------------------------------------------------------------
// Where restore() reads the tensors from.

struct Staged {
  const checkpoint::TensorInfo* info = nullptr;
  at::Tensor host;  // contiguous CPU tensor of info's dtype and shape, filled by the source
};

struct Source {
  const checkpoint::Manifest* manifest = nullptr;
  std::string where;  // for messages: the checkpoint directory or "the loaded state"
  std::function<void(std::vector<Staged>&)> read;
};

Source checkpoint_source(const checkpoint::Checkpoint& c) {
  Source s;
  s.manifest = &c.manifest();
  s.where = c.dir().string();
  s.read = [&c](std::vector<Staged>& staged) {
    std::vector<checkpoint::TensorView> views;
    views.reserve(staged.size());
    for (auto& st : staged) views.push_back(to_tensor_view(st.host, st.info->name));
    c.load_into(views);
  };
  return s;
}

Source pieces_source(std::span<const checkpoint::LoadedState> pieces) {
  if (pieces.empty()) throw InvalidArgumentError("restore: no loaded state given");
  const auto& first = pieces.front().manifest;
  for (size_t i = 1; i < pieces.size(); ++i) {
    const auto& m = pieces[i].manifest;
    if (m.save_id != first.save_id || m.step != first.step || m.tensors != first.tensors)
      throw InvalidArgumentError(fmt::format("restore: loaded state {} is from save {} (step {}), state 0 from save {} "
                                             "(step {}): the pieces must come from one checkpoint",
                                             i, m.save_id, m.step, first.save_id, first.step));
  }
  Source s;
  s.manifest = &first;
  s.where = pieces.front().dir.empty() ? fmt::format("received state (save {})", first.save_id)
                                       : pieces.front().dir.string();
  s.read = [pieces, where = s.where](std::vector<Staged>& staged) {
    for (auto& st : staged) {
      auto* dest = static_cast<uint8_t*>(st.host.data_ptr());
      std::vector<std::pair<uint64_t, uint64_t>> covered;
      for (const auto& piece : pieces) {
        const checkpoint::LoadedTensor* part = piece.find(st.info->name);
        if (!part || part->bytes.empty()) continue;
        std::memcpy(dest + part->first_byte, part->bytes.data(), part->bytes.size());
        covered.emplace_back(part->first_byte, part->first_byte + part->bytes.size());
      }
      std::sort(covered.begin(), covered.end());
      uint64_t reached = 0;
      for (const auto& [begin, end] : covered)
        if (begin <= reached) reached = std::max(reached, end);
      if (reached < st.info->bytes)
        throw InvalidArgumentError(fmt::format("{}: tensor {} is not complete in the {} loaded piece(s): bytes from {} "
                                               "of {} are missing (load the ranges of every reader)",
                                               where, st.info->name, pieces.size(), reached, st.info->bytes));
    }
  };
  return s;
}

// ---------------------------------------------------------------------------------------------

struct ModuleTarget {
  at::Tensor live;
  size_t staged;  // index into the staged list
};
struct OptimizerField {
  std::string field;
  size_t staged;
};
struct OptimizerTarget {
  at::Tensor param;
  std::vector<OptimizerField> fields;
};
struct OptionValue {
  double* number = nullptr;
  bool* flag = nullptr;
  double value = 0;
  bool truth = false;
};
struct RngTarget {
  at::Generator generator;
  at::Tensor state;
};

void check_match(const std::string& where, const checkpoint::TensorInfo& info, DType dtype,
                 const std::vector<int64_t>& shape, std::string_view has) {
  if (info.dtype != dtype)
    throw InvalidArgumentError(fmt::format("{}: tensor {} is {} in the checkpoint but {} in the {}", where, info.name,
                                           dtype_name(info.dtype), dtype_name(dtype), has));
  if (info.shape != shape)
    throw InvalidArgumentError(fmt::format("{}: tensor {} has shape {} in the checkpoint but {} in the {}", where,
                                           info.name, shape_string(info.shape), shape_string(shape), has));
}

at::Tensor staging_tensor(const checkpoint::TensorInfo& info, const at::Tensor& destination) {
  auto options = at::TensorOptions().dtype(internal::scalar_type_of(info.dtype));
  // Pinned when it goes to a GPU next: the host-to-device copy is then a plain DMA.
  if (destination.defined() && destination.is_cuda()) options = options.pinned_memory(true);
  return at::empty(at::IntArrayRef(info.shape.data(), info.shape.size()), options);
}

std::vector<int64_t> sizes_of(const at::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

uint64_t restore_from(const Source& source, torch::nn::Module& module, torch::optim::Optimizer* optimizer,
                      const RestoreOptions& options) {
  const checkpoint::Manifest& manifest = *source.manifest;
  const std::string& where = source.where;
  std::vector<Staged> staged;

  // 1. Check everything against the manifest; allocate host staging tensors.
  std::vector<ModuleTarget> module_targets;
  std::set<std::string> module_names;
  for (auto& [name, live] : module_tensors(module)) {
    module_names.insert(name);
    const checkpoint::TensorInfo* info = manifest.find_tensor(name);
    if (!info)
      throw InvalidArgumentError(fmt::format("{}: the checkpoint has no tensor {} (the module's is {} {})", where, name,
                                             dtype_name(dtype_of(live, name)), shape_string(live.sizes())));
    check_match(where, *info, dtype_of(live, name), sizes_of(live), "module");
    module_targets.push_back({live, staged.size()});
    staged.push_back({info, staging_tensor(*info, live)});
  }
  if (options.strict)
    for (const auto& info : manifest.tensors)
      if (info.name.starts_with(kModulePrefix) && !module_names.count(info.name))
        throw InvalidArgumentError(fmt::format("{}: the module has no tensor {} ({} {}) of the checkpoint", where,
                                               info.name, dtype_name(info.dtype), shape_string(info.shape)));

  std::vector<OptimizerTarget> optimizer_targets;
  std::vector<OptionValue> option_values;
  const OptimizerAdapter* adapter = nullptr;
  if (optimizer) {
    adapter = &internal::adapter_for(*optimizer);
    auto metadata = [&](const std::string& key) -> const std::string& {
      auto it = manifest.metadata.find(key);
      if (it == manifest.metadata.end())
        throw InvalidArgumentError(fmt::format("{}: metadata {} is missing: the checkpoint holds no {} optimizer state",
                                               where, key, adapter->kind()));
      return it->second;
    };
    if (metadata(std::string(kOptimizerKey)) != adapter->kind())
      throw InvalidArgumentError(fmt::format("{}: the checkpoint's optimizer is {}, this one is {}", where,
                                             metadata(std::string(kOptimizerKey)), adapter->kind()));
    auto groups = group_parameter_names(module, *optimizer);
    if (metadata(std::string(kGroupsKey)) != std::to_string(groups.size()))
      throw InvalidArgumentError(fmt::format("{}: the checkpoint's optimizer has {} parameter groups, this one {}", where,
                                             metadata(std::string(kGroupsKey)), groups.size()));
    std::map<std::string, at::Tensor> params_by_name;
    auto& param_groups = optimizer->param_groups();
    for (size_t g = 0; g < groups.size(); ++g) {
      std::string saved_params = metadata(group_key(g, "params"));
      if (saved_params != join_lines(groups[g])) {
        std::replace(saved_params.begin(), saved_params.end(), '\n', ' ');
        throw InvalidArgumentError(fmt::format("{}: optimizer parameter group {} holds other parameters in the "
                                               "checkpoint ({}) than here ({})",
                                               where, g, saved_params, fmt::join(groups[g], " ")));
      }
      for (const auto& field : adapter->options(param_groups[g].options())) {
        std::string key = group_key(g, field.name);
        const std::string& text = metadata(key);
        OptionValue v{field.number, field.flag};
        if (field.number) {
          v.value = internal::parse_exact(text, fmt::format("{}: metadata {}", where, key));
        } else if (text == "true" || text == "false") {
          v.truth = text == "true";
        } else {
          throw InvalidArgumentError(fmt::format("{}: metadata {}: \"{}\" is not true or false", where, key, text));
        }
        option_values.push_back(v);
      }
      for (size_t i = 0; i < groups[g].size(); ++i) params_by_name.emplace(groups[g][i], param_groups[g].params()[i]);
    }

    std::map<std::string, OptimizerTarget> by_param;
    auto blank = adapter->make_state();
    auto blank_fields = adapter->fields(*blank);
    for (const auto& info : manifest.tensors) {
      if (!info.name.starts_with(kOptimizerPrefix)) continue;
      std::string_view rest = std::string_view(info.name).substr(kOptimizerPrefix.size());
      size_t slash = rest.rfind('/');
      std::string param_name(rest.substr(0, slash == std::string_view::npos ? 0 : slash));
      std::string_view field_name = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
      auto param = params_by_name.find(param_name);
      auto field = std::find_if(blank_fields.begin(), blank_fields.end(), [&](const auto& f) { return f.name == field_name; });
      if (param == params_by_name.end() || field == blank_fields.end()) {
        if (!options.strict) continue;
        throw InvalidArgumentError(fmt::format("{}: tensor {} of the checkpoint has no place in this {} optimizer ({})",
                                               where, info.name, adapter->kind(),
                                               param == params_by_name.end() ? "no such optimized parameter"
                                                                             : "no such state field"));
      }
      if (field->counter) {
        check_match(where, info, DType::Int64, {}, fmt::format("{} optimizer (a step counter)", adapter->kind()));
      } else if (info.shape != sizes_of(param->second)) {
        throw InvalidArgumentError(fmt::format("{}: tensor {} has shape {} in the checkpoint but its parameter {} has {}",
                                               where, info.name, shape_string(info.shape), param_name,
                                               shape_string(param->second.sizes())));
      }
      auto& target = by_param[param_name];
      target.param = param->second;
      target.fields.push_back({std::string(field_name), staged.size()});
      staged.push_back({&info, staging_tensor(info, param->second)});
    }
    for (auto& [name, target] : by_param) optimizer_targets.push_back(std::move(target));
  }

  std::vector<RngTarget> rng_targets;
  if (options.rng) {
    for (const auto& [name, bytes] : manifest.blobs) {
      std::optional<at::Device> device;
      if (name == kCpuRngBlob) {
        device = at::Device(at::kCPU);
      } else if (name.starts_with(kCudaRngBlobPrefix)) {
        int index = std::atoi(name.c_str() + kCudaRngBlobPrefix.size());
        if (!torch::cuda::is_available() || index >= static_cast<int>(torch::cuda::device_count())) {
          log::warn("checkpoint", "{}: blob {} not restored: this process has no CUDA device {}", where, name, index);
          continue;
        }
        device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
      } else {
        continue;
      }
      at::Generator generator = at::globalContext().defaultGenerator(*device);
      at::Tensor current = generator.get_state();
      if (static_cast<size_t>(current.numel()) != bytes.size())
        throw InvalidArgumentError(fmt::format("{}: blob {} holds {} bytes, but this torch's {} generator state has {}",
                                               where, name, bytes.size(), device->str(), current.numel()));
      at::Tensor state = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
      std::memcpy(state.data_ptr(), bytes.data(), bytes.size());
      rng_targets.push_back({generator, state});
    }
  }

  // 2. Read and verify everything into host memory; nothing of the module is touched yet.
  source.read(staged);

  // 3. Commit.
  at::NoGradGuard no_grad;
  for (auto& t : module_targets) t.live.copy_(staged[t.staged].host);
  if (optimizer) {
    auto& state_map = optimizer->state();
    for (const auto& group : optimizer->param_groups())
      for (const auto& p : group.params()) state_map.erase(internal::state_key(p));
    for (auto& target : optimizer_targets) {
      auto state = adapter->make_state();
      auto fields = adapter->fields(*state);
      for (const auto& f : target.fields) {
        auto field = std::find_if(fields.begin(), fields.end(), [&](const auto& x) { return x.name == f.field; });
        const at::Tensor& host = staged[f.staged].host;
        if (field->counter) {
          *field->counter = host.item<int64_t>();
        } else {
          *field->tensor = host.to(target.param.device());  // the tensor itself when already there
        }
      }
      state_map[internal::state_key(target.param)] = std::move(state);
    }
    for (const auto& v : option_values) {
      if (v.number) *v.number = v.value;
      if (v.flag) *v.flag = v.truth;
    }
  }
  for (auto& r : rng_targets) {
    std::lock_guard<std::mutex> lock(r.generator.mutex());
    r.generator.set_state(r.state);
  }
  return manifest.step;
}

}  // namespace

struct Snapshot::Held {
  std::vector<at::Tensor> tensors;
};

Snapshot::Snapshot() : held_(std::make_unique<Held>()) {}
Snapshot::~Snapshot() = default;
Snapshot::Snapshot(Snapshot&&) noexcept = default;
Snapshot& Snapshot::operator=(Snapshot&&) noexcept = default;

Snapshot snapshot(const torch::nn::Module& module, const torch::optim::Optimizer* optimizer, uint64_t step,
                  const SnapshotOptions& options) {
  Snapshot snap;
  checkpoint::State& state = snap.state_;
  state.step = step;
  std::vector<NamedTensor> entries = module_tensors(module);

  if (optimizer) {
    const OptimizerAdapter& adapter = internal::adapter_for(*optimizer);
    auto groups = group_parameter_names(module, *optimizer);
    state.metadata[std::string(kOptimizerKey)] = std::string(adapter.kind());
    state.metadata[std::string(kGroupsKey)] = std::to_string(groups.size());
    const auto& state_map = optimizer->state();
    const auto& param_groups = optimizer->param_groups();
    for (size_t g = 0; g < groups.size(); ++g) {
      state.metadata[group_key(g, "params")] = join_lines(groups[g]);
      // Read only; the adapters hand out mutable references because restore() writes through them.
      auto& group_options = const_cast<torch::optim::OptimizerOptions&>(param_groups[g].options());
      for (const auto& field : adapter.options(group_options))
        state.metadata[group_key(g, field.name)] = field.number ? internal::format_exact(*field.number)
                                                                : (*field.flag ? "true" : "false");
      const auto& params = param_groups[g].params();
      for (size_t i = 0; i < params.size(); ++i) {
        auto it = state_map.find(internal::state_key(params[i]));
        if (it == state_map.end()) continue;  // never stepped: no state yet
        for (const auto& field : adapter.fields(*it->second)) {
          std::string name = optimizer_tensor_name(groups[g][i], field.name);
          if (field.counter) {
            entries.push_back({std::move(name), at::scalar_tensor(*field.counter, at::kLong)});
          } else if (field.tensor->defined()) {
            entries.push_back({std::move(name), *field.tensor});
          }
        }
      }
    }
  }
  state.metadata["torch.version"] = fmt::format("{}.{}.{}", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);

  // Device tensors go to pinned host memory, all copies queued before one synchronization per
  // device. The copies run on each device's current stream: synchronizing the devices first
  // orders them after work still queued on other streams (a training step on a side stream).
  auto& held = snap.held_->tensors;
  std::set<c10::DeviceIndex> devices;
  for (const auto& e : entries) {
    dtype_of(e.tensor, e.name);  // refuse unsupported dtypes before copying anything
    if (e.tensor.is_cuda()) devices.insert(e.tensor.device().index());
  }
  for (auto device : devices) torch::cuda::synchronize(device);
  for (auto& e : entries) {
    at::Tensor t = e.tensor.detach();
    if (t.is_cuda()) {
      at::Tensor host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
      host.copy_(t, /*non_blocking=*/true);
      t = host;
    } else if (options.copy_cpu_tensors || !t.is_contiguous()) {
      t = t.clone(at::MemoryFormat::Contiguous);
    }
    held.push_back(t);
    e.tensor = t;
  }
  for (auto device : devices) torch::cuda::synchronize(device);
  state.tensors.reserve(entries.size());
  for (auto& e : entries) state.tensors.push_back(to_tensor_view(e.tensor, std::move(e.name)));

  if (options.rng) {
    at::Generator cpu = at::globalContext().defaultGenerator(at::Device(at::kCPU));
    {
      std::lock_guard<std::mutex> lock(cpu.mutex());
      state.blobs[std::string(kCpuRngBlob)] = tensor_bytes(cpu.get_state());
    }
    if (torch::cuda::is_available()) {
      // device_count() is a size_t in torch 1.x, a c10::DeviceIndex in 2.x.
      auto devices = static_cast<c10::DeviceIndex>(torch::cuda::device_count());
      for (c10::DeviceIndex i = 0; i < devices; ++i) {
        at::Generator gpu = at::globalContext().defaultGenerator(at::Device(at::kCUDA, i));
        std::lock_guard<std::mutex> lock(gpu.mutex());
        state.blobs[fmt::format("{}{}", kCudaRngBlobPrefix, i)] = tensor_bytes(gpu.get_state());
      }
    }
  }
  return snap;
}

uint64_t restore(const checkpoint::Checkpoint& checkpoint, torch::nn::Module& module, torch::optim::Optimizer* optimizer,
                 const RestoreOptions& options) {
  return restore_from(checkpoint_source(checkpoint), module, optimizer, options);
}

uint64_t restore(std::span<const checkpoint::LoadedState> pieces, torch::nn::Module& module,
                 torch::optim::Optimizer* optimizer, const RestoreOptions& options) {
  return restore_from(pieces_source(pieces), module, optimizer, options);
}

}  // namespace meshtrain::torch_glue
