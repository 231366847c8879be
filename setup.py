"""Builds batchless_kernels._C from csrc/: always the C++ CPU kernels, plus the CUDA ops (csrc/cuda:
kernels in *.cu, compiled by nvcc; their host side in *.cpp, compiled by the host compiler) when a
CUDA toolkit and a CUDA build of torch are present.

Environment switches:
  BATCHLESS_BUILD_CUDA=1|0   force the CUDA sources on or off (default: auto-detect)
  BATCHLESS_CPU_ISA=auto|avx512|avx2|default   vector ISA of the CPU kernels (auto, the default: the
                             widest this CPU has; default: at::vec without vector extensions)
  BATCHLESS_HOST_DEBUG=1     keep debug information in the C++ objects (default: -g0, a faster build)

Install with `pip install --no-build-isolation -e .` so the extension compiles against the torch
already installed (build isolation would fetch and compile against another torch).

The build needs ninja (`pip install ninja`): without it torch's BuildExtension silently falls back to
compiling one file after another through distutils, so this file stops with an error instead. It
compiles MAX_JOBS files at once (default: the number of cores this process may use; ninja's own
default, cores + 2, oversubscribes small machines), and prints one `[n/N] ...` line per compiled
file (pip shows them with `-v`; .ci/setup_env.sh shows them as they come).
"""

import glob
import os
import platform
import site
import sys

# torch guesses CUDA_HOME from the nvcc on PATH; the toolkit's standard place is a better guess.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

import torch  # noqa: E402
from torch.utils.cpp_extension import is_ninja_available  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# Architectures compiled for when no GPU is here to ask (CI, build machines): A100 and H100/H200.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name} must be 1/0/on/off/auto, got {os.environ[name]!r}")


def _cpu_has(*features):
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(feature in flags for feature in features)


def _cpu_isa_flags():
    """at::vec picks its vector width from CPU_CAPABILITY macros; set them for this machine."""
    isa = os.environ.get("BATCHLESS_CPU_ISA", "auto").strip().lower()
    if isa not in ("auto", "avx512", "avx2", "default"):
        raise ValueError(f"BATCHLESS_CPU_ISA must be auto, avx512, avx2 or default, got {isa!r}")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if isa == "avx512" or (isa == "auto" and x86 and _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        # bf16 stores in one instruction where this machine has it (csrc/cpu: Chunk::store)
        bf16 = ["-mavx512bf16"] if isa == "auto" and _cpu_has("avx512_bf16") else []
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", *bf16, "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2" or (isa == "auto" and x86 and _cpu_has("avx2", "fma", "f16c")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _nvidia_include_dirs():
    """Headers of the pip-installed CUDA libraries (nvidia/cu13/include...): ATen's CUDA headers
    include cusparse.h and cublas headers that live only there when CUDA comes from wheels."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(path) and path not in found:
                found.append(path)
    return found


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    build_cuda = _env_flag("BATCHLESS_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if build_cuda is None:
        build_cuda = cuda_possible and bool(cuda_sources)
    if build_cuda and not cuda_possible:
        raise RuntimeError(
            "BATCHLESS_BUILD_CUDA=1 but CUDA cannot be built here: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    # -g0: Python's CFLAGS (which torch's build uses) carry -g; host debug information made the CPU
    # files compile ~2.5x slower (csrc/cpu/batchless_nll_cpu.cpp: 42 s against 102-114 s on the
    # 2-core machine) and the library 18x larger (19.3 MB against 1.1 MB). BATCHLESS_HOST_DEBUG=1 keeps it.
    debug = _env_flag("BATCHLESS_HOST_DEBUG")
    cxx = ["-O3", "-fopenmp", *_cpu_isa_flags(), *([] if debug else ["-g0"])]
    kwargs = dict(
        name="batchless_kernels._C",
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            print(f"[setup.py] no GPU to query: compiling for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        kwargs["include_dirs"] += _nvidia_include_dirs()
        # nvcc's -O sets the host code's optimization only (the device code's is ptxas's own -O3):
        # -O2 compiled the norm kernels' host side (then in one file) in 39 s against 57 s at -O3 (sm_90, this
        # 2-core machine), the SASS byte for byte the same (cuobjdump -sass); the host side launches.
        kwargs["extra_compile_args"]["nvcc"] = ["-O2", "-lineinfo"]
        kwargs["define_macros"] = [("BATCHLESS_WITH_CUDA", "1")]
        return CUDAExtension(sources=cpp_sources + cuda_sources, **kwargs)
    return CppExtension(sources=cpp_sources, **kwargs)


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# torch looks for `ninja` on PATH; pip's ninja lies beside this interpreter, and a venv that was not
# activated (`.venv/bin/python -m pip ...`) does not have that folder on PATH.
_bin = os.path.dirname(sys.executable)
if os.path.exists(os.path.join(_bin, "ninja")) and _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


class _BuildExtension(BuildExtension):
    """torch's BuildExtension with ninja required and MAX_JOBS defaulting to the cores we may use."""

    def run(self):
        if not is_ninja_available():
            raise SystemExit(
                "[setup.py] error: ninja not found. It compiles the extension's files in parallel; without it "
                "torch's BuildExtension would fall back to one file at a time (several times slower). "
                f"Install it into this Python with `{sys.executable} -m pip install ninja` and build again.")
        os.environ.setdefault("MAX_JOBS", str(_cores()))
        print(f"[setup.py] compiling with ninja, MAX_JOBS={os.environ['MAX_JOBS']}", flush=True)
        super().run()


setup(
    packages=find_packages(include=["batchless_kernels", "batchless_kernels.*"]),
    # The package lies at the top of the repository. Saying so (rather than leaving package_dir
    # empty) makes setuptools' editable install a plain .pth file instead of a meta path finder,
    # whose BuildBackendWarning ("Editable installation... Please be careful with folders in your
    # working directory") pip printed to stderr on every `pip install -e .`.
    package_dir={"": "."},
    # auto's measured choice between the GPU backends (bench/derive_gpu_choice.py writes it)
    package_data={"batchless_kernels": ["gpu_choice.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
