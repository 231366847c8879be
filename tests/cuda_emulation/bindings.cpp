// Python bindings of the CUDA emulation extension (tests/cuda_emulation/build.py): the simulated
// device's settings, the engine's statistics and launch log, the mutant switch, and the engine's
// selftests. The kernels themselves are torch ops (TORCH_LIBRARY_IMPL(<library>, CPU) in the
// rewritten csrc/cuda sources).
// pybind11 alone, not <torch/extension.h>: nothing here takes or returns a tensor, and torch's
// whole C++ API made this file the slowest of the build after the kernels (53 s against 10 s at -O2,
// 85 s under the sanitizers' flags, compiled once per variant).
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "engine.h"

namespace py = pybind11;

namespace emu_selftest {
std::vector<std::string> selftest_names();
std::vector<double> run_selftest(const std::string& name);
}  // namespace emu_selftest

namespace {

py::dict settings_dict() {
  const emu::Settings& s = emu::settings();
  py::dict d;
  d["sm_count"] = s.sm_count;
  d["blocks_per_sm"] = s.blocks_per_sm;
  d["shared_per_block"] = s.shared_per_block;
  d["schedule"] = s.schedule == emu::Schedule::kForward   ? "forward"
                  : s.schedule == emu::Schedule::kReverse ? "reverse"
                  : s.schedule == emu::Schedule::kRandom  ? "random"
                  : s.schedule == emu::Schedule::kLagging ? "lagging"
                                                          : "alternate";
  d["seed"] = s.seed;
  return d;
}

py::tuple dims(dim3 d) { return py::make_tuple(d.x, d.y, d.z); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of batchless_kernels run on the CPU by a fiber engine (tests only)";
  m.def(
      "configure",
      [](int sm_count, int blocks_per_sm, int64_t shared_per_block, const std::string& schedule, uint64_t seed) {
        TORCH_CHECK(sm_count > 0, "sm_count must be positive");
        TORCH_CHECK(blocks_per_sm >= 0, "blocks_per_sm must be >= 0 (0: from the block's size)");
        TORCH_CHECK(shared_per_block > 0 && shared_per_block <= 227 * 1024, "shared_per_block out of range");
        emu::Settings& s = emu::settings();
        s.sm_count = sm_count;
        s.blocks_per_sm = blocks_per_sm;
        s.shared_per_block = static_cast<size_t>(shared_per_block);
        if (schedule == "forward") {
          s.schedule = emu::Schedule::kForward;
        } else if (schedule == "reverse") {
          s.schedule = emu::Schedule::kReverse;
        } else if (schedule == "alternate") {
          s.schedule = emu::Schedule::kAlternate;
        } else if (schedule == "random") {
          s.schedule = emu::Schedule::kRandom;
        } else if (schedule == "lagging") {
          s.schedule = emu::Schedule::kLagging;
        } else {
          TORCH_CHECK(false, "schedule must be forward, reverse, lagging, alternate or random, got ", schedule);
        }
        s.seed = seed;
        return settings_dict();
      },
      py::arg("sm_count") = 132, py::arg("blocks_per_sm") = 0, py::arg("shared_per_block") = 48 * 1024,
      py::arg("schedule") = "alternate", py::arg("seed") = 0);
  m.def("settings", &settings_dict);
  m.def("stats", [] {
    const emu::Stats& s = emu::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    d["barriers"] = s.barriers;
    d["collectives"] = s.collectives;
    d["occupancy_queries"] = s.occupancy_queries;
    d["max_shared"] = s.max_shared;
    return d;
  });
  m.def("reset_stats", [] {
    emu::stats() = emu::Stats{};
    emu::launch_log().clear();
  });
  m.def("launch_log", [] {
    py::list out;
    for (const auto& r : emu::launch_log()) {
      out.append(py::make_tuple(r.kernel, dims(r.grid), dims(r.block), r.dynamic_shared, r.instance));
    }
    return out;
  });
  m.def("take_unchecked", &emu::take_unchecked,
        "Whether the last launch was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK (and forget it)");
  m.def("set_mutant", [](int id) { emu::active_mutant = id; });
  m.def("mutant", [] { return emu::active_mutant; });
  m.def("selftest_names", &emu_selftest::selftest_names);
  m.def("run_selftest", &emu_selftest::run_selftest);
}
