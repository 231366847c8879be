// Settings and statistics of the CUDA emulation engine (engine.cpp), for its Python bindings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "emu_cuda.h"

namespace emu {

enum class Schedule { kForward, kReverse, kAlternate, kRandom, kLagging };

// The simulated device: its multiprocessor count and (when > 0) the blocks per multiprocessor that
// occupancy queries answer (else derived from the block size and shared memory), so tests can force
// the launchers' tilings.
struct Settings {
  int sm_count = 132;
  int blocks_per_sm = 0;
  size_t shared_per_block = 48 * 1024;
  Schedule schedule = Schedule::kAlternate;
  uint64_t seed = 0;  // of the random schedule
};

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0, occupancy_queries = 0;
  uint64_t max_shared = 0;
};

struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t dynamic_shared;
  std::string instance;  // the kernel's __PRETTY_FUNCTION__ (kernels with __launch_bounds__), else ""
};

Settings& settings();
Stats& stats();
std::vector<LaunchRecord>& launch_log();
bool take_unchecked();

}  // namespace emu
