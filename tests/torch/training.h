// The training run of the torch glue tests, shared by the test binary and the writer processes
// (torch_trainer): a small MLP with batch norm and dropout, trained on batches drawn from torch's
// default CPU generator, so that a resumed run matches only if parameters, buffers, optimizer
// state, optimizer options and the RNG state all come back exactly.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <memory>
#include <stdexcept>
#include <string>

namespace meshtrain::test_support {

inline constexpr int64_t kInputs = 8;
inline constexpr int64_t kOutputs = 3;
inline constexpr int64_t kBatch = 16;

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(int64_t hidden, bool with_head = false)
      : fc1(register_module("fc1", torch::nn::Linear(kInputs, hidden))),
        norm(register_module("norm", torch::nn::BatchNorm1d(hidden))),
        drop(register_module("drop", torch::nn::Dropout(0.2))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, kOutputs))) {
    if (with_head) head = register_module("head", torch::nn::Linear(kOutputs, kOutputs));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = fc2(drop(at::relu(norm(fc1(x)))));
    return head ? head(y) : y;
  }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d norm;
  torch::nn::Dropout drop;
  torch::nn::Linear fc2;
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Mlp);

// kind: sgd (momentum), adam (two parameter groups), adam-amsgrad, adamw, adagrad, rmsprop
// (centered, with momentum).
inline std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind, Mlp& model) {
  namespace optim = torch::optim;
  if (kind == "sgd") return std::make_unique<optim::SGD>(model->parameters(), optim::SGDOptions(0.05).momentum(0.9));
  if (kind == "adam") {
    // Two groups: fc1 learns faster. Checks that groups and per-group options come back.
    std::vector<at::Tensor> first = model->fc1->parameters(), rest;
    for (auto& p : model->norm->parameters()) rest.push_back(p);
    for (auto& p : model->fc2->parameters()) rest.push_back(p);
    if (model->head)
      for (auto& p : model->head->parameters()) rest.push_back(p);
    std::vector<optim::OptimizerParamGroup> groups;
    groups.emplace_back(first, std::make_unique<optim::AdamOptions>(optim::AdamOptions(2e-2)));
    groups.emplace_back(rest);
    return std::make_unique<optim::Adam>(std::move(groups), optim::AdamOptions(1e-2));
  }
  if (kind == "adam-amsgrad") return std::make_unique<optim::Adam>(model->parameters(), optim::AdamOptions(1e-2).amsgrad(true));
  if (kind == "adamw") return std::make_unique<optim::AdamW>(model->parameters(), optim::AdamWOptions(1e-2));
  if (kind == "adagrad") return std::make_unique<optim::Adagrad>(model->parameters(), optim::AdagradOptions(0.05));
  if (kind == "rmsprop")
    return std::make_unique<optim::RMSprop>(model->parameters(),
                                            optim::RMSpropOptions(1e-2).momentum(0.5).centered(true));
  throw std::invalid_argument("unknown optimizer kind " + kind);
}

struct TrainingRun {
  Mlp model;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  uint64_t step = 0;

  // Seeds torch's generator, then builds the model (its initial weights come from the seed).
  TrainingRun(uint64_t seed, const std::string& optimizer_kind, int64_t hidden = 64, bool with_head = false)
      : model((at::manual_seed(seed), Mlp(hidden, with_head))), optimizer(make_optimizer(optimizer_kind, model)) {}

  void train(uint64_t steps) {
    model->train();
    for (uint64_t i = 0; i < steps; ++i, ++step) {
      at::Tensor x = at::randn({kBatch, kInputs});
      at::Tensor target = at::sin(x.narrow(1, 0, kOutputs) * 2.0) + x.narrow(1, kOutputs, kOutputs);
      at::Tensor loss = (model->forward(x) - target).pow(2).mean();
      optimizer->zero_grad();
      loss.backward();
      optimizer->step();
      // A schedule: the first group's learning rate decays, so a resumed run needs the saved one.
      auto& options = optimizer->param_groups()[0].options();
      options.set_lr(options.get_lr() * 0.97);
    }
  }
};

}  // namespace meshtrain::test_support
