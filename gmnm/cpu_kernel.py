"""The C++/OpenMP CPU kernel: lazy build, loading, and the calls into it.

The source (`gmnm/csrc/mixture_cpu.cpp`) is compiled on first use with
`torch.utils.cpp_extension.load` (ninja and the system C++ compiler) into a per-user cache,
`$GMNM_EXTENSIONS_DIR` or `~/.cache/gmnm/extensions`, in a folder named after the torch
version, the Python version and the CPU, so one home directory shared by different machines
never loads a library built for another CPU. Nothing is compiled at install time: a machine
without a compiler, or any failing build, logs one warning and `library()` returns None, which
sends the mixture to the plain PyTorch path.

The library has a C interface over raw pointers (no pybind11, no torch headers), which keeps
the build to a few seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "mixture_cpu.cpp"
ABI_VERSION = 1
# -ffp-contract=fast: the build runs in ISO C++ mode, where GCC would not fuse a*b + c into one
# instruction; the kernel relies on fused multiply-adds for speed (its exponent split calls
# std::fma explicitly where it needs one for accuracy)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]

# Modes of the kernel: what `out` (forward) and `dx` (backward) start from.
MODE_WRITE = 0  # the mixture alone
MODE_ACCUMULATE = 1  # added to what the buffer holds (a base computed by PyTorch)
MODE_LINEAR = 2  # added to a learned a*x + c computed in the kernel

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# Elements per thread below which more threads cost more (waking them, and waiting for them on
# a busy machine) than they save.
_ELEMENTS_PER_THREAD = 1 << 15

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be built or loaded on this machine."""


def cache_directory() -> Path:
    """Where built libraries live: per user, per torch/Python version and per CPU."""
    root = os.environ.get("GMNM_EXTENSIONS_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "gmnm" / "extensions"
    cpu = hashlib.sha256(_cpu_description().encode()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_version = torch.__version__.replace("+", "_")
    return base / f"{python}-torch{torch_version}-{platform.machine()}-{cpu}"


def _cpu_description() -> str:
    # -march=native ties the library to the CPU's instruction set; the flags line names it.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it cannot be had."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _build_and_load()
            except (KernelBuildError, OSError, RuntimeError, ImportError, ValueError) as error:
                _failure = _summarise(error)
                logger.warning(
                    "the GMNM C++ CPU kernel could not be built (%s); falling back to the plain "
                    "PyTorch path, which is several times slower on CPU. Install a C++ compiler "
                    "and ninja (pip install ninja) to use it, or set GMNM_BACKEND=recompute to "
                    "choose the plain path explicitly.",
                    _failure,
                )
    return _library


def _summarise(error: BaseException) -> str:
    """One line of a build error: the compiler's first `error:` line, else the last line that
    is not ninja's own bookkeeping (a shell's "not found", a linker message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    compiler_errors = [line for line in lines if "error:" in line]
    if compiler_errors:
        return compiler_errors[0]
    bookkeeping = ("[", "FAILED:", "ninja:", "Error building extension")
    messages = [line for line in lines if not line.startswith(bookkeeping)]
    if messages:
        return messages[-1]
    return lines[0] if lines else repr(error)


def failure() -> str | None:
    """Why the kernel is unavailable, once a build has been attempted and failed."""
    return _failure


def reset() -> None:
    """Forget the outcome of the last build attempt so that the next use tries again."""
    global _library, _failure
    with _lock:
        _library = None
        _failure = None


@contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    # cpp_extension warns about CUDA_HOME on machines without CUDA (irrelevant to this CPU-only
    # build) and about compilers other than g++; a failed build is reported by the one warning
    # of `library()` instead.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_logger.setLevel(level)


def _build_and_load() -> ctypes.CDLL:
    directory = cache_directory()
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("loading the GMNM C++ CPU kernel from %s (built there on first use)", directory)
    try:
        with _quiet_cpp_extension():
            from torch.utils import cpp_extension

            path = cpp_extension.load(
                name="gmnm_mixture_cpu",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
    except subprocess.CalledProcessError as error:
        raise KernelBuildError(f"compiler failed: {error}") from error
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.gmnm_cpu_abi_version() != ABI_VERSION:
        raise KernelBuildError(
            f"{path} has ABI version {lib.gmnm_cpu_abi_version()}, expected {ABI_VERSION}; "
            f"delete {directory} to rebuild it"
        )
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.gmnm_cpu_abi_version.restype = i32
    lib.gmnm_cpu_abi_version.argtypes = []
    lib.gmnm_cpu_forward.restype = i32
    lib.gmnm_cpu_forward.argtypes = [i32, vp, vp, i64, i64, i64, i64, i64]
    lib.gmnm_cpu_forward.argtypes += [vp, vp, vp, vp, vp, i32, i32]
    lib.gmnm_cpu_backward.restype = i32
    lib.gmnm_cpu_backward.argtypes = [i32, vp, vp, vp, i64, i64, i64, i64, i64]
    lib.gmnm_cpu_backward.argtypes += [vp, vp, vp, vp, i32, vp, i32]


def supports(x: Tensor) -> bool:
    """Whether the kernel handles this input (dtype and device), not whether it is built."""
    return x.device.type == "cpu" and x.dtype in (*_DTYPE_CODES, torch.float16)


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // _ELEMENTS_PER_THREAD))


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(
    x: Tensor,
    out: Tensor,
    layout: tuple[int, int, int],
    pi: Tensor,
    mu: Tensor,
    scale: Tensor,
    mode: int,
    a: Tensor | None = None,
    c: Tensor | None = None,
) -> None:
    """Write `init + mixture(x)` into `out` (contiguous, x's dtype and shape).

    `layout` is (C, inner, G); parameters are contiguous in the compute dtype.
    """
    lib = _require()
    channels, inner, groups = layout
    status = lib.gmnm_cpu_forward(
        _DTYPE_CODES[x.dtype],
        x.data_ptr(),
        out.data_ptr(),
        x.numel(),
        channels,
        inner,
        groups,
        pi.shape[1],
        pi.data_ptr(),
        mu.data_ptr(),
        scale.data_ptr(),
        _pointer(a),
        _pointer(c),
        mode,
        _threads(x.numel()),
    )
    _check(status, "forward")


def backward(
    x: Tensor,
    grad: Tensor,
    grad_x: Tensor,
    layout: tuple[int, int, int],
    pi: Tensor,
    mu: Tensor,
    scale: Tensor,
    mode: int,
    a: Tensor | None = None,
) -> Tensor:
    """Write the input gradient into `grad_x`; return the raw per-group sums (G, 3K + 2)."""
    lib = _require()
    channels, inner, groups = layout
    k = pi.shape[1]
    sums = torch.zeros(groups, 3 * k + 2, dtype=torch.float64)
    status = lib.gmnm_cpu_backward(
        _DTYPE_CODES[x.dtype],
        x.data_ptr(),
        grad.data_ptr(),
        grad_x.data_ptr(),
        x.numel(),
        channels,
        inner,
        groups,
        k,
        pi.data_ptr(),
        mu.data_ptr(),
        scale.data_ptr(),
        _pointer(a),
        mode,
        sums.data_ptr(),
        _threads(x.numel()),
    )
    _check(status, "backward")
    return sums


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise KernelBuildError(f"the GMNM C++ CPU kernel is not available: {_failure}")
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise ValueError(
            f"the GMNM C++ kernel refused its {what} arguments (status {status}); this is a bug "
            "in gmnm.cpu_kernel's argument checks, please report it with the input's shape"
        )
