// selftest.h: checks of the CUDA emulator itself (see selftest.cpp).
#pragma once
#include <string>

namespace pyreg::emu {
std::string selftest(const std::string& name);
}  // namespace pyreg::emu
