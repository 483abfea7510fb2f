// One reduction attempt of Communicator::run_step (the step loop behind both reduce_step
// overloads) and what follows its outcome.
#pragma once

namespace meshtrain::collective {

struct StepAttempt {
  virtual ~StepAttempt() = default;
  virtual void run() = 0;       // the reduction, against the current quorum
  virtual void rollback() {}    // the attempt failed or was aborted (run_step restores the gradients)
  virtual void commit() {}      // the coordinator committed the attempt
};

}  // namespace meshtrain::collective
