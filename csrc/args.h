// Argument checks shared by awpfast._C (csrc/cpu) and awpfast._C_cuda (csrc/cuda): every list
// handed over from Python must hold one entry per tensor.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <stdexcept>
#include <string>

struct ListLen {
  const char* name;
  size_t got;
  bool optional = false;  // an empty optional list means "not given"
};

// Throws std::invalid_argument (a Python ValueError) naming the first list of the wrong length.
inline void check_lens(const char* module, size_t want, std::initializer_list<ListLen> lists) {
  for (const ListLen& l : lists) {
    if (l.optional && l.got == 0) continue;
    if (l.got != want)
      throw std::invalid_argument(std::string(module) + ": " + l.name + " has " + std::to_string(l.got) +
                                  " entries, expected " + std::to_string(want));
  }
}
