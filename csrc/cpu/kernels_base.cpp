// The CPU range kernels for the x86-64 (or other target) baseline instruction set.
#include "scalar.h"

namespace awp_base {
#include "kernels.inc"
}  // namespace awp_base
