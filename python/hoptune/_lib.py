"""Loads the compiled kernels (``hoptune._C``) and decides, per tensor, whether they can run.

The module is imported lazily: ``import hoptune`` neither loads it nor creates a CUDA context.
Dispatch rule: CUDA tensors on an sm_90 GPU use the kernels; CPU tensors use the PyTorch
reference; CUDA tensors on any other GPU use the reference with a one-time warning. Setting
``HOPTUNE_DISABLE_KERNELS=1`` forces the reference everywhere (useful to bisect a problem); it is
read once, when the kernels are first asked for.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

# dtype codes shared with csrc/include/hoptune/common/check.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_warned: set[str] = set()


def _memo(fn):
    """``functools.cache`` as a plain function over a dict (with its ``cache_clear``). The ops'
    dispatch checks (kernels_run_on) run inside compiled models, and torch.compile traces a call
    through functools' cache wrappers into the function itself, with a warning: into the
    extension's loader, whose import breaks the graph. A dict it reads as a constant."""
    memo: dict = {}

    @functools.wraps(fn)
    def cached(*args):
        if args in memo:
            return memo[args]
        value = memo[args] = fn(*args)
        return value

    cached.cache_clear = memo.clear
    return cached


@_memo
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        # (import_module: `from hoptune import _C` turns a missing module into "cannot import name")
        _C = importlib.import_module("hoptune._C")
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "hoptune._C":
            return None, (
                "the CUDA extension hoptune._C is not built (this is a pure-Python install: nvcc was "
                f"not found at install time, or HOPTUNE_BUILD_CUDA=0): {e}"
            )
        # the module is there but its shared library does not load (a CUDA runtime or C++ library
        # missing or too old on this machine): a different fix than building it
        return None, f"the CUDA extension hoptune._C is installed but failed to load: {e}"
    # the CUDA runtime is linked statically, so the module loads under any driver; its kernels then
    # fail on every call (cudaErrorInsufficientDriver) where the driver predates the runtime's major
    # version (CUDA 13 needs a driver of that major version, minor versions are compatible)
    built, driver = getattr(_C, "CUDA_RUNTIME_VERSION", None), _driver_version()
    if isinstance(built, int) and driver is not None and driver // 1000 < built // 1000:
        return None, (
            f"the CUDA extension hoptune._C was built with CUDA {_cuda_version(built)}, and this "
            f"machine's NVIDIA driver supports CUDA up to {_cuda_version(driver)}: update the driver, "
            f"or reinstall hoptune (pip install .) with a CUDA {driver // 1000} toolkit's nvcc"
        )
    return _C, None


def _cuda_version(v: int) -> str:
    """12080 -> "12.8" (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _driver_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports (cuDriverGetVersion, e.g. 12080), or
    None where there is no driver (a machine without an NVIDIA GPU). Needs no CUDA context."""
    import ctypes

    try:
        lib = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value


def extension() -> ModuleType | None:
    """The compiled module, or None when this install has no CUDA kernels."""
    return _load()[0]


def env_off(name: str, default: str) -> bool:
    """Whether environment variable ``name`` (``default`` when unset) reads as off: 0, false, no,
    off or empty, in any case (as transformers reads its boolean variables)."""
    return os.environ.get(name, default).strip().lower() in ("", "0", "false", "no", "off")


@_memo
def _disabled() -> bool:
    """HOPTUNE_DISABLE_KERNELS, read once (an environment lookup costs microseconds of host time
    per call, and use_kernel runs on every op call). 0, false, no, off or empty leave the kernels
    on (transformers reads these as false too); any other value turns them off."""
    return not env_off("HOPTUNE_DISABLE_KERNELS", "")


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be used in this process (None when they can, on an sm_90 GPU)."""
    mod, why = _load()
    if mod is None:
        return why
    if _disabled():
        return "HOPTUNE_DISABLE_KERNELS is set"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the kernels are built for sm_90a (H100/H200); this GPU is sm_{major}{minor}"
    return None


def kernels_available() -> bool:
    """Whether hoptune's CUDA kernels can run here: the extension is built and loads, they are not
    disabled, and the current GPU is sm_90 (H100 / H200); ``hoptune._lib.unavailable_reason()``
    says why not."""
    return unavailable_reason() is None


@_memo
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def kernels_run_on(t: torch.Tensor) -> bool:
    """Whether hoptune's CUDA kernels can run on tensor ``t``'s device (built, not disabled, sm_90),
    without use_kernel's warning: for callers whose fallback is PyTorch's own behaviour."""
    return t.is_cuda and _load()[0] is not None and not _disabled() and _capability(t.get_device()) == (9, 0)


def use_kernel(t: torch.Tensor, op: str) -> bool:
    """True when ``op`` should run its CUDA kernel on tensor ``t`` (else the PyTorch reference).
    Called on every op invocation: cheap (cached capability, no device query)."""
    if kernels_run_on(t):
        return True
    if not t.is_cuda or _disabled():
        return False
    mod, why = _load()
    if mod is None:
        reason = why
    else:
        major, minor = _capability(t.get_device())
        reason = (
            f"the kernels are built for sm_90a; {torch.cuda.get_device_name(t.device)} is sm_{major}{minor}"
        )
    warn_once(op, f"hoptune.{op}: using the PyTorch reference on CUDA because {reason}", stacklevel=3)
    return False


def warn_once(key: str, message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process; ``stacklevel`` as
    warnings.warn's, counted from the caller of warn_once."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def stream(t: torch.Tensor) -> int:
    """Integer handle of the current CUDA stream on ``t``'s device (called on every kernel launch:
    the raw C accessor when this torch has it, a few microseconds cheaper than the Stream object).

    The kernels launch on the current CUDA device (they take raw pointers, not tensors), so ``t``
    must be on it: a tensor on another GPU gets a clear error instead of a launch that fails or
    reads another device's memory."""
    index = t.get_device()  # (a CUDA tensor's device always has an index)
    current = _current_device()
    if index != current:
        raise RuntimeError(
            f"hoptune's CUDA kernels run on the current CUDA device (cuda:{current}), but the "
            f"tensors are on cuda:{index}: call torch.cuda.set_device({index}) first, or run "
            f"the call inside `with torch.cuda.device({index}):`"
        )
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
