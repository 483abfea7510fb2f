// The optimizers the glue can save and restore, described field by field.
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <typeinfo>

#include <c10/util/Type.h>

#include "meshtrain/core.h"
#include "internal.h"

namespace meshtrain::torch_glue::internal {
namespace optim = torch::optim;

namespace {

StateField tensor(std::string_view name, at::Tensor& t) { return {name, &t, nullptr}; }
StateField counter(std::string_view name, int64_t& c) { return {name, nullptr, &c}; }
OptionField number(std::string_view name, double& d) { return {name, &d, nullptr}; }
OptionField flag(std::string_view name, bool& b) { return {name, nullptr, &b}; }

std::vector<StateField> state_fields(optim::SGDParamState& s) { return {tensor("momentum_buffer", s.momentum_buffer())}; }
template <typename AdamLike>
std::vector<StateField> adam_fields(AdamLike& s) {
  return {counter("step", s.step()), tensor("exp_avg", s.exp_avg()), tensor("exp_avg_sq", s.exp_avg_sq()),
          tensor("max_exp_avg_sq", s.max_exp_avg_sq())};
}
std::vector<StateField> state_fields(optim::AdamParamState& s) { return adam_fields(s); }
std::vector<StateField> state_fields(optim::AdamWParamState& s) { return adam_fields(s); }
std::vector<StateField> state_fields(optim::AdagradParamState& s) { return {counter("step", s.step()), tensor("sum", s.sum())}; }
std::vector<StateField> state_fields(optim::RMSpropParamState& s) {
  return {counter("step", s.step()), tensor("square_avg", s.square_avg()), tensor("momentum_buffer", s.momentum_buffer()),
          tensor("grad_avg", s.grad_avg())};
}

std::vector<OptionField> option_fields(optim::SGDOptions& o) {
  return {number("lr", o.lr()), number("momentum", o.momentum()), number("dampening", o.dampening()),
          number("weight_decay", o.weight_decay()), flag("nesterov", o.nesterov())};
}
template <typename AdamLike>
std::vector<OptionField> adam_options(AdamLike& o) {
  return {number("lr", o.lr()), number("beta1", std::get<0>(o.betas())), number("beta2", std::get<1>(o.betas())),
          number("eps", o.eps()), number("weight_decay", o.weight_decay()), flag("amsgrad", o.amsgrad())};
}
std::vector<OptionField> option_fields(optim::AdamOptions& o) { return adam_options(o); }
std::vector<OptionField> option_fields(optim::AdamWOptions& o) { return adam_options(o); }
std::vector<OptionField> option_fields(optim::AdagradOptions& o) {
  return {number("lr", o.lr()), number("lr_decay", o.lr_decay()), number("weight_decay", o.weight_decay()),
          number("initial_accumulator_value", o.initial_accumulator_value()), number("eps", o.eps())};
}
std::vector<OptionField> option_fields(optim::RMSpropOptions& o) {
  return {number("lr", o.lr()), number("alpha", o.alpha()), number("eps", o.eps()), number("weight_decay", o.weight_decay()),
          number("momentum", o.momentum()), flag("centered", o.centered())};
}

// `object` as the optimizer's own type; InvalidArgumentError naming both types otherwise.
template <typename Typed, typename Base>
Typed& as_type(Base& object, std::string_view kind, std::string_view what) {
  auto* typed = dynamic_cast<Typed*>(&object);
  if (!typed)
    throw InvalidArgumentError(fmt::format("{} optimizer: {} is a {}, not the {}'s", kind, what,
                                           c10::demangle(typeid(object).name()), kind));
  return *typed;
}

template <typename Optimizer, typename ParamState, typename Options>
class AdapterFor final : public OptimizerAdapter {
 public:
  explicit AdapterFor(std::string_view kind) : kind_(kind) {}
  std::string_view kind() const override { return kind_; }
  bool matches(const optim::Optimizer& o) const { return dynamic_cast<const Optimizer*>(&o) != nullptr; }
  std::unique_ptr<optim::OptimizerParamState> make_state() const override { return std::make_unique<ParamState>(); }
  std::vector<StateField> fields(optim::OptimizerParamState& state) const override {
    return state_fields(as_type<ParamState>(state, kind_, "a parameter's state"));
  }
  std::vector<OptionField> options(optim::OptimizerOptions& options) const override {
    return option_fields(as_type<Options>(options, kind_, "a parameter group's options"));
  }

 private:
  std::string_view kind_;
};

}  // namespace

bool OptimizerAdapter::has_field(std::string_view name) const {
  auto blank = make_state();
  for (const auto& f : fields(*blank))
    if (f.name == name) return true;
  return false;
}

const OptimizerAdapter& adapter_for(const optim::Optimizer& optimizer) {
  static const AdapterFor<optim::SGD, optim::SGDParamState, optim::SGDOptions> sgd("sgd");
  static const AdapterFor<optim::Adam, optim::AdamParamState, optim::AdamOptions> adam("adam");
  static const AdapterFor<optim::AdamW, optim::AdamWParamState, optim::AdamWOptions> adamw("adamw");
  static const AdapterFor<optim::Adagrad, optim::AdagradParamState, optim::AdagradOptions> adagrad("adagrad");
  static const AdapterFor<optim::RMSprop, optim::RMSpropParamState, optim::RMSpropOptions> rmsprop("rmsprop");
  if (sgd.matches(optimizer)) return sgd;
  if (adam.matches(optimizer)) return adam;
  if (adamw.matches(optimizer)) return adamw;
  if (adagrad.matches(optimizer)) return adagrad;
  if (rmsprop.matches(optimizer)) return rmsprop;
  throw InvalidArgumentError(fmt::format("optimizer {} is not supported by the torch glue (SGD, Adam, AdamW, Adagrad, RMSprop)",
                                         c10::demangle(typeid(optimizer).name())));
}

// printf's %a, not fmt's {:a}: fmt versions differ (fmt 12, bundled with torch 2.x, prints zero
// as 0x0p-1022, fmt 9 as 0x0p+0), and the same state must give the same checkpoint with either.
std::string format_exact(double value) {
  char text[64];
  std::snprintf(text, sizeof text, "%a", value);
  return text;
}

double parse_exact(std::string_view text, std::string_view what) {
  std::string copy(text);
  char* end = nullptr;
  errno = 0;
  double value = std::strtod(copy.c_str(), &end);
  if (copy.empty() || end != copy.c_str() + copy.size() || errno == ERANGE)
    throw InvalidArgumentError(fmt::format("{}: \"{}\" is not a number", what, text));
  return value;
}

}  // namespace meshtrain::torch_glue::internal
