// dtype codes shared by the Python side (awpfast/ops/native.py) and both extensions.
#pragma once

enum DtypeCode : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kNumDtypes = 4,
};
