// Saves a torch module and its SGD optimizer as a checkpoint through the installed torch glue,
// restores them into a second module, and checks that the weights match. Exit status 0 on
// success.
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <meshtrain/checkpoint.h>
#include <meshtrain/torch.h>

int main() {
  namespace fs = std::filesystem;
  std::string pattern = (fs::temp_directory_path() / "meshtrain-consumer-XXXXXX").string();
  if (!::mkdtemp(pattern.data())) return 1;
  fs::path root = pattern;
  int status = 1;
  try {
    torch::nn::Linear saved(4, 2);
    torch::optim::SGD sgd(saved->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    saved(torch::randn({8, 4})).sum().backward();
    sgd.step();
    meshtrain::checkpoint::save(root, meshtrain::torch_glue::snapshot(*saved, &sgd, 1).state());

    torch::nn::Linear loaded(4, 2);
    torch::optim::SGD sgd2(loaded->parameters(), torch::optim::SGDOptions(0.5).momentum(0.9));
    uint64_t step = meshtrain::torch_glue::restore(meshtrain::checkpoint::Checkpoint::open(root), *loaded, &sgd2);
    bool same = torch::equal(saved->weight, loaded->weight) && torch::equal(saved->bias, loaded->bias) &&
                sgd2.param_groups()[0].options().get_lr() == 0.1;
    std::printf("restored step %llu: %s\n", static_cast<unsigned long long>(step), same ? "weights match" : "MISMATCH");
    status = same ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  fs::remove_all(root);
  return status;
}
