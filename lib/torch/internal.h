// Internals of the torch glue shared by its sources: the per-optimizer adapters that name an
// optimizer's per-parameter state and options, and the key of a parameter in Optimizer::state().
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "meshtrain/core.h"

namespace meshtrain::torch_glue::internal {

// One field of an optimizer's per-parameter state: a tensor or an int64 counter.
struct StateField {
  std::string_view name;
  at::Tensor* tensor = nullptr;
  int64_t* counter = nullptr;
};

// One option of a parameter group: a number or a flag.
struct OptionField {
  std::string_view name;
  double* number = nullptr;
  bool* flag = nullptr;
};

class OptimizerAdapter {
 public:
  virtual ~OptimizerAdapter() = default;
  virtual std::string_view kind() const = 0;  // "adam", "sgd", ...
  virtual std::unique_ptr<torch::optim::OptimizerParamState> make_state() const = 0;
  // The fields of a parameter's state (tensors may be undefined: not used by this run, e.g.
  // max_exp_avg_sq without amsgrad). Throws InvalidArgumentError when `state` is another type.
  virtual std::vector<StateField> fields(torch::optim::OptimizerParamState& state) const = 0;
  virtual std::vector<OptionField> options(torch::optim::OptimizerOptions& options) const = 0;
  // Whether `name` is one of the fields of this optimizer's state.
  bool has_field(std::string_view name) const;
};

// The adapter for the optimizer's dynamic type; InvalidArgumentError naming the type when it
// is not supported.
const OptimizerAdapter& adapter_for(const torch::optim::Optimizer& optimizer);

// The key of a parameter in Optimizer::state(): a pointer in torch 2.x, its printed form
// (c10::guts::to_string of the TensorImpl*) in torch 1.x.
using StateMap = std::remove_cvref_t<decltype(std::declval<torch::optim::Optimizer&>().state())>;
using StateKey = StateMap::key_type;

template <typename Key = StateKey>  // a template, so that the branch not taken is not compiled
Key state_key(const at::Tensor& parameter) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream printed;  // what c10::guts::to_string does for a pointer
    printed << static_cast<const void*>(parameter.unsafeGetTensorImpl());
    return printed.str();
  } else {
    return parameter.unsafeGetTensorImpl();
  }
}

at::ScalarType scalar_type_of(DType dtype);

// "<digits>" of a finite double exactly (hexadecimal floating point), and back.
std::string format_exact(double value);
double parse_exact(std::string_view text, std::string_view what);

}  // namespace meshtrain::torch_glue::internal
