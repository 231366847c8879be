// The Python module `batchless_kernels._C`. Importing it loads this library and with it the ops'
// registrations (schemas in csrc/ops.cpp, kernels per backend, autograd in csrc/autograd.cpp).
//
// Its attributes:
//   cpu_capability: the vector ISA the CPU kernels were compiled for (setup.py, BATCHLESS_CPU_ISA):
//     "AVX512" (with "_BF16" when bf16 rounds in one instruction), "AVX2" or "DEFAULT". Their speed
//     depends on it: benchmarks record it.
//   batchless_norm_fast(x, mean, std_param, weight, bias, parametrization, eps, gauge, backend, need_nll):
//     functional.batchless_norm's common case, checked and dispatched here: (y, nll), or None where
//     the call is not that case (functional.py then takes its general path, which also raises the
//     errors). On small inputs the Python checks and torch.ops' argument parsing cost as much as the
//     kernels (issue 12: ~6 us a call against F.batch_norm's 2.7 us).
//   cpu_stream_threshold(bytes), cpu_stream_copy(src): the byte size from which the CPU kernels write
//     their outputs with non-temporal stores (set by tests), and a copy written so (the benchmark's
//     ceiling), in csrc/cpu/batchless_norm_cpu.cpp.
//   set_fast_path(cpu, cuda, auto_cpu, auto_cuda, environ, key, auto): whether this library's kernels
//     with the one-node training op run CPU / CUDA tensors, whether backend "auto" always picks them
//     there, and where BATCHLESS_BACKEND is read: os.environ's dict of bytes and the encoded name and
//     "auto" (functional.py sets it once at import).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>

#include "batchless_host.h"

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#define BATCHLESS_STRINGIFY_(x) #x
#define BATCHLESS_STRINGIFY(x) BATCHLESS_STRINGIFY_(x)

// Whether this CPU runs a feature: glibc's view where it has one (2.33 on: what the CPU and the OS
// support, less what GLIBC_TUNABLES' glibc.cpu.hwcaps masks, which the tests use), else GCC's cpuid.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if __has_include(<sys/platform/x86.h>)
#include <sys/platform/x86.h>
#define BATCHLESS_CPU_HAS(glibc_name, gcc_name) CPU_FEATURE_ACTIVE(glibc_name)
#else
#define BATCHLESS_CPU_HAS(glibc_name, gcc_name) __builtin_cpu_supports(gcc_name)
#endif
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace batchless_kernels {
namespace {

using at::Tensor;

// Set from Python (set_fast_path): whether the "cpu" / "cuda" backends run here with the one-node
// training op, and whether "auto" picks them for every CPU / CUDA tensor.
bool kernels_cpu = false, kernels_cuda = false, auto_cpu = false, auto_cuda = false;
// os.environ's dict of bytes (its _data), BATCHLESS_BACKEND and "auto" encoded as its keys and values,
// also set from Python: the override is read where backends._env_backend reads it. getenv could
// disagree (os.unsetenv and os.putenv do not update os.environ). nullptr: getenv.
PyObject *environ_data = nullptr, *env_key = nullptr, *env_auto = nullptr;

// Keys of tensors whose ops mean something else than the plain kernels': Python subclasses and
// modes (FakeTensor, torch.export's tracing), functorch's wrappers (vmap, grad), functionalization.
const c10::DispatchKeySet kWrapperKeys({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                        c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                        c10::DispatchKey::Functionalize});

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// obj as a plain dense tensor of a floating dtype on the CPU or a GPU (torch.Tensor or nn.Parameter:
// a subclass may override what the ops do), else nullptr.
const Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!(t.is_cpu() || t.is_cuda()) || t.layout() != at::kStrided || t.is_nested() ||
      !is_float_dtype(t.scalar_type()) || t.key_set().has_any(kWrapperKeys)) {
    return nullptr;
  }
  return &t;
}

// Whether t is a (C,) parameter of x on x's device.
bool per_channel(const Tensor* t, const Tensor& x) {
  return t != nullptr && t->dim() == 1 && t->size(0) == x.size(1) && t->device() == x.device();
}

// Optional parameter: None, or a (C,) tensor as above. Returns false where it is neither.
bool optional_per_channel(PyObject* obj, const Tensor& x, std::optional<Tensor>& out) {
  if (obj == Py_None) return true;
  const Tensor* t = plain_tensor(obj);
  if (!per_channel(t, x)) return false;
  out = *t;
  return true;
}

// The one-node training op and the inference op (csrc/ops.cpp), looked up once.
using TrainSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                  c10::string_view, double, bool);
using InferenceSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                  const std::optional<Tensor>&, c10::string_view, double);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Releases the GIL for the kernels (other Python threads run meanwhile, as around ATen's own ops),
// and takes it back also when they throw.
struct GilRelease {
  PyThreadState* state = PyEval_SaveThread();
  ~GilRelease() { PyEval_RestoreThread(state); }
};

// Whether the str `text` is `ascii`, all of it (an embedded NUL does not end it, as it would strcmp).
bool equals(PyObject* text, const char* ascii) { return PyUnicode_CompareWithASCIIString(text, ascii) == 0; }

// Whether BATCHLESS_BACKEND is set to something else than "auto" or empty (unset, as backends.py reads
// it). Where it cannot tell (an error looking it up), yes: the Python path then decides.
bool env_overrides_auto() {
  if (environ_data == nullptr) {
    const char* env = std::getenv("BATCHLESS_BACKEND");
    return env != nullptr && env[0] != '\0' && std::strcmp(env, "auto") != 0;
  }
  PyObject* value = PyDict_GetItemWithError(environ_data, env_key);  // borrowed
  if (value == nullptr) {
    if (!PyErr_Occurred()) return false;
    PyErr_Clear();
    return true;
  }
  const Py_ssize_t length = PyObject_Length(value);  // bytes, or str on platforms without _data's bytes
  if (length == 0) return false;
  if (length < 0) PyErr_Clear();
  const int is_auto = PyObject_RichCompareBool(value, env_auto, Py_EQ);
  if (is_auto < 0) PyErr_Clear();
  return is_auto != 1;
}

// Whether `backend` (a str) runs x on this library's kernels: "auto" where it always picks them and
// BATCHLESS_BACKEND (backends.py) does not override it, or "cpu" / "cuda" naming x's device.
bool runs_library_kernels(PyObject* backend, const Tensor& x) {
  if (!PyUnicode_CheckExact(backend)) return false;
  if (equals(backend, "auto")) {
    if (env_overrides_auto()) return false;
    return x.is_cpu() ? auto_cpu : auto_cuda;
  }
  if (equals(backend, "cpu")) return x.is_cpu() && kernels_cpu;
  if (equals(backend, "cuda")) return x.is_cuda() && kernels_cuda;
  return false;
}

bool transforms_or_modes_active() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  // Tracer: torch.jit.trace records one op for every grad mode (functional.batchless_norm).
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) || included.has(c10::DispatchKey::Tracer) ||
         c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled();
}

PyObject* batchless_norm_fast(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) {
    PyErr_SetString(PyExc_TypeError, "batchless_norm_fast takes 10 positional arguments");
    return nullptr;
  }
  if (transforms_or_modes_active()) Py_RETURN_NONE;
  const Tensor* x_arg = plain_tensor(args[0]);
  if (x_arg == nullptr || x_arg->dim() < 2 || !runs_library_kernels(args[8], *x_arg)) Py_RETURN_NONE;
  const Tensor* mean_arg = plain_tensor(args[1]);
  const Tensor* std_param_arg = plain_tensor(args[2]);
  std::optional<Tensor> weight, bias;
  if (!per_channel(mean_arg, *x_arg) || !per_channel(std_param_arg, *x_arg) ||
      !optional_per_channel(args[3], *x_arg, weight) || !optional_per_channel(args[4], *x_arg, bias)) {
    Py_RETURN_NONE;
  }
  // Owned references: the kernels run without the GIL, while another thread may swap the tensors
  // behind these Python objects (torch.utils.swap_tensors).
  const Tensor x = *x_arg, mean = *mean_arg, std_param = *std_param_arg;
  // Forward-mode AD (dual tensors, torch.autograd.forward_ad): the general path runs the spec.
  const auto dual = [](const Tensor& t) { return t._fw_grad(/*level=*/0).defined(); };
  if (dual(x) || dual(mean) || dual(std_param) || (weight && dual(*weight)) || (bias && dual(*bias))) {
    Py_RETURN_NONE;
  }
  // parametrization one of abs, log, inv; eps a positive finite float; gauge a bool; need_nll None
  // or a bool: anything else (an int eps too) is checked, converted or refused by the general path.
  PyObject* parametrization = args[5];
  const char* kind = nullptr;
  for (const char* name : {"abs", "log", "inv"}) {
    if (PyUnicode_CheckExact(parametrization) && equals(parametrization, name)) kind = name;
  }
  if (kind == nullptr) Py_RETURN_NONE;
  if (!PyFloat_CheckExact(args[6])) Py_RETURN_NONE;
  const double eps = PyFloat_AS_DOUBLE(args[6]);
  // At least the smallest normal number of the accumulation dtype (functional.batchless_norm says why).
  // A normal number of the accumulation dtype (nll::check_eps); else the general path's ValueError.
  const bool is_double = x.scalar_type() == at::kDouble;
  if (!(eps >= (is_double ? DBL_MIN : FLT_MIN) && eps <= (is_double ? DBL_MAX : FLT_MAX))) Py_RETURN_NONE;
  if (!PyBool_Check(args[7])) Py_RETURN_NONE;
  const bool gauge = args[7] == Py_True;
  PyObject* need_nll_arg = args[9];
  if (need_nll_arg != Py_None && !PyBool_Check(need_nll_arg)) Py_RETURN_NONE;

  // functional.batchless_norm's choice of op, step for step.
  const bool grad_mode = at::GradMode::is_enabled();
  const bool need_nll = need_nll_arg == Py_None ? grad_mode && (mean.requires_grad() || std_param.requires_grad())
                                                : need_nll_arg == Py_True;
  // Inside a backward pass (a reentrant checkpoint's recomputation) the general path may warn.
  if (need_nll && torch::autograd::get_current_graph_task_id() != -1) Py_RETURN_NONE;
  const bool y_needs_grad = grad_mode && (x.requires_grad() || (weight && weight->requires_grad()) ||
                                          (bias && bias->requires_grad()));
  Tensor y, nll;
  if (!need_nll && !y_needs_grad) {
    // mean and std_param are constants of y (sg), as in the training op.
    static const auto inference = op<InferenceSignature>("batchless_kernels::batchless_norm_inference");
    const Tensor m = grad_mode ? mean.detach() : mean;
    const Tensor p = grad_mode ? std_param.detach() : std_param;
    GilRelease released;
    y = inference.call(x, m, p, weight, bias, kind, eps);
  } else {
    static const auto train = op<TrainSignature>("batchless_kernels::batchless_norm_train");
    GilRelease released;
    std::tie(y, nll) = train.call(x, mean, std_param, weight, bias, kind, eps, gauge);
  }
  // Owned until the tuple takes them: a wrap that throws leaks neither.
  THPObjectPtr py_y(THPVariable_Wrap(std::move(y)));
  THPObjectPtr py_nll(need_nll ? THPVariable_Wrap(std::move(nll)) : Py_NewRef(Py_None));
  if (!py_y || !py_nll) return nullptr;
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, py_y.release());
  PyTuple_SET_ITEM(result, 1, py_nll.release());
  return result;
  END_HANDLE_TH_ERRORS
}

PyObject* set_fast_path(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7 || !PyBool_Check(args[0]) || !PyBool_Check(args[1]) || !PyBool_Check(args[2]) ||
      !PyBool_Check(args[3]) ||
      !(args[4] == Py_None || (PyDict_Check(args[4]) && (PyBytes_Check(args[5]) || PyUnicode_Check(args[5])) &&
                               (PyBytes_Check(args[6]) || PyUnicode_Check(args[6]))))) {
    // (os.environ's keys and values are bytes on POSIX, str on Windows)
    PyErr_SetString(PyExc_TypeError, "set_fast_path(cpu: bool, cuda: bool, auto_cpu: bool, auto_cuda: bool, "
                                     "environ: dict | None, key: bytes | str, auto: bytes | str)");
    return nullptr;
  }
  for (PyObject** slot : {&environ_data, &env_key, &env_auto}) Py_CLEAR(*slot);
  if (args[4] != Py_None) {
    environ_data = Py_NewRef(args[4]);
    env_key = Py_NewRef(args[5]);
    env_auto = Py_NewRef(args[6]);
  }
  kernels_cpu = args[0] == Py_True;
  kernels_cuda = args[1] == Py_True;
  auto_cpu = kernels_cpu && args[2] == Py_True;
  auto_cuda = kernels_cuda && args[3] == Py_True;
  Py_RETURN_NONE;
}

// set_cpu_stream_threshold(bytes): the byte size from which the CPU kernels write y and dx with
// non-temporal stores, set (bytes >= 0) for tests; returns the previous one. -1 reads it.
PyObject* cpu_stream_threshold(PyObject* /*self*/, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(set_cpu_stream_threshold(bytes));
}

// cpu_stream_copy(src): src copied with the CPU kernels' non-temporal stores (the benchmark's ceiling).
PyObject* stream_copy(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  if (!THPVariable_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "cpu_stream_copy: expected a Tensor for src, got %s", Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  return THPVariable_Wrap(batchless_kernels::cpu_stream_copy(THPVariable_Unpack(arg)));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"cpu_stream_threshold", cpu_stream_threshold, METH_O,
     "cpu_stream_threshold(bytes): the CPU kernels write outputs of at least this many bytes with "
     "non-temporal stores (default: a quarter of the last-level cache; the inference op from twice it); "
     "bytes >= 0 sets it (tests), -1 reads it. Returns the previous value."},
    {"cpu_stream_copy", stream_copy, METH_O,
     "cpu_stream_copy(src): a copy of the dense CPU tensor src (contiguous in some dim order), with its "
     "strides, written with the CPU kernels' non-temporal stores at any size: the benchmark's copy ceiling."},
    {"batchless_norm_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(batchless_norm_fast)),
     METH_FASTCALL, "functional.batchless_norm's common case in C++: (y, nll), or None for the general path."},
    {"set_fast_path", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_fast_path)), METH_FASTCALL,
     "set_fast_path(cpu, cuda, auto_cpu, auto_cuda, environ, key, auto): what batchless_norm_fast runs, and "
     "where it reads BATCHLESS_BACKEND."},
    {nullptr, nullptr, 0, nullptr}};

// The first vector extension the CPU kernels were compiled for (setup.py, BATCHLESS_CPU_ISA) that this
// CPU lacks, or null: a build copied to an older machine would otherwise die of SIGILL in its first
// kernel call.
const char* missing_cpu_feature() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const std::pair<const char*, bool> features[] = {
#if defined(CPU_CAPABILITY_AVX512)
      {"avx512f", BATCHLESS_CPU_HAS(AVX512F, "avx512f")},
      {"avx512bw", BATCHLESS_CPU_HAS(AVX512BW, "avx512bw")},
      {"avx512vl", BATCHLESS_CPU_HAS(AVX512VL, "avx512vl")},
      {"avx512dq", BATCHLESS_CPU_HAS(AVX512DQ, "avx512dq")},
#if defined(__AVX512BF16__)
      {"avx512_bf16", BATCHLESS_CPU_HAS(AVX512_BF16, "avx512bf16")},
#endif
#else
      {"avx2", BATCHLESS_CPU_HAS(AVX2, "avx2")},
#endif
      {"fma", BATCHLESS_CPU_HAS(FMA, "fma")},
      {"f16c", BATCHLESS_CPU_HAS(F16C, "f16c")},
  };
  for (const auto& [name, present] : features) {
    if (!present) return name;
  }
#endif
  return nullptr;
}

}  // namespace
}  // namespace batchless_kernels

extern "C" {
PyObject* PyInit__C(void) {
  if (const char* missing = batchless_kernels::missing_cpu_feature()) {
    PyErr_Format(PyExc_ImportError,
                 "batchless_kernels._C was compiled for the vector instructions %s (setup.py's "
                 "BATCHLESS_CPU_ISA, docs/install.md), but this CPU lacks %s: rebuild it on this machine "
                 "(pip install --no-build-isolation -e .), or with BATCHLESS_CPU_ISA=avx2 or default",
                 BATCHLESS_STRINGIFY(CPU_CAPABILITY), missing);
    return nullptr;
  }
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          batchless_kernels::methods};
  PyObject* module = PyModule_Create(&module_def);
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  const char* isa = BATCHLESS_STRINGIFY(CPU_CAPABILITY) "_BF16";
#else
  const char* isa = BATCHLESS_STRINGIFY(CPU_CAPABILITY);
#endif
  if (module != nullptr && PyModule_AddStringConstant(module, "cpu_capability", isa) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
