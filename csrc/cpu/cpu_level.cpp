// The x86 vector level the CPU kernels run (see fc_x86_level), for the Python side's choices between
// kernels whose speed depends on it (the fused engine's sparse hidden layers).
#include <torch/library.h>
#include "common.h"

namespace {
int64_t cpu_level() { return fc_x86_level(); }
}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CatchAll, m) { m.impl("cpu_level", &cpu_level); }
