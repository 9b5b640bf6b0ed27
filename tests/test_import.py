import re
import subprocess
import sys

import pytest


def _passes_in_a_fresh_interpreter(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_is_lean():
    """import hoptune (and its ops and quant packages) creates no CUDA context and no transformers import."""
    code = (
        "import sys, torch, hoptune, hoptune.ops, hoptune.quant\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialized at import'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported by import hoptune'\n"
        "assert 'hoptune._C' not in sys.modules, 'the extension was loaded at import'\n"
        "print('ok')\n"
    )
    _passes_in_a_fresh_interpreter(code)


def test_lazy_attributes():
    import hoptune

    assert callable(hoptune.quantize_nf4)
    try:
        hoptune.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_subpackages_and_decoder_ops_after_a_bare_import():
    """The README names hoptune.quant.save_pretrained_nf4 after ``import hoptune`` and the decoder
    ops as hoptune.ops.rms_norm / silu_mul / rope: both were AttributeErrors (the ops lived in
    hoptune.ops.decoder only, and a subpackage needed its own import)."""
    code = (
        "import sys, torch, hoptune\n"
        "assert callable(hoptune.quant.save_pretrained_nf4)\n"
        "assert callable(hoptune.ops.nf4_lora_linear)\n"
        "for name in ('rms_norm', 'silu_mul', 'rope'):\n"
        "    assert getattr(hoptune.ops, name) is getattr(hoptune.ops.decoder, name), name\n"
        "    assert hasattr(torch.ops.hoptune, name), name\n"
        "assert 'ops' in dir(hoptune) and 'plan' in dir(hoptune) and callable(hoptune.plan)\n"
        "assert not torch.cuda.is_initialized() and 'transformers' not in sys.modules\n"
        "print('ok')\n"
    )
    _passes_in_a_fresh_interpreter(code)


@pytest.mark.parametrize("version, refused", [("2.5.1+cu124", True), ("2.6.0", True), ("1.13.1", True),
                                               ("2.7.1+cu126", False), ("2.13.0+cpu", False), ("2.16.0a0+git1", False), ("3.0.0", False)])  # fmt: skip
def test_a_torch_below_the_floor_is_one_clear_error(version, refused):
    """torch 2.5 / 2.6 refused the ops' list[int] annotations with a schema error from deep inside
    torch.library at ``import hoptune.ops``; below pyproject's floor the import says so instead."""
    from hoptune.ops import _torch_floor

    if refused:
        with pytest.raises(
            ImportError, match=rf"hoptune needs torch >= 2\.7; this is torch {re.escape(version)}"
        ):
            _torch_floor.check(version)
    else:
        _torch_floor.check(version)


def test_unavailable_reason_is_explained():
    from hoptune import _lib

    reason = _lib.unavailable_reason()
    assert reason is None or len(reason) > 10


def test_kernel_stream_refuses_a_tensor_off_the_current_device(monkeypatch):
    """The kernels take raw pointers and launch on the current CUDA device: a tensor on another GPU
    gets an error naming both devices and the fix, not a launch on the wrong device."""
    import pytest

    from hoptune import _lib

    class OnSecondGPU:  # stands for a CUDA tensor on cuda:1 (this test runs without two GPUs)
        def get_device(self):
            return 1

    monkeypatch.setattr(_lib, "_current_device", lambda: 0)
    monkeypatch.setattr(_lib, "_raw_stream", lambda index: 1000 + index)
    with pytest.raises(RuntimeError, match=r"cuda:0.*cuda:1.*torch\.cuda\.set_device\(1\)"):
        _lib.stream(OnSecondGPU())
    monkeypatch.setattr(_lib, "_current_device", lambda: 1)
    assert _lib.stream(OnSecondGPU()) == 1001

    class OnFirstGPU:  # and one on cuda:0 while cuda:1 is current
        def get_device(self):
            return 0

    with pytest.raises(RuntimeError, match=r"cuda:1.*cuda:0.*torch\.cuda\.set_device\(0\)"):
        _lib.stream(OnFirstGPU())


def test_extension_not_built_or_not_loading_are_told_apart(monkeypatch):
    """No hoptune._C at all (a pure-Python install) and a hoptune._C whose library fails to load
    (e.g. a CUDA runtime missing on the machine) get different reasons: the fixes differ."""
    import importlib.abc

    from hoptune import _lib

    class Refuse(importlib.abc.MetaPathFinder):
        def __init__(self, error):
            self.error = error

        def find_spec(self, name, path=None, target=None):
            if name == "hoptune._C":
                raise self.error
            return None

    import hoptune

    monkeypatch.delitem(sys.modules, "hoptune._C", raising=False)
    monkeypatch.delattr(hoptune, "_C", raising=False)
    try:
        for error, want in (
            (ModuleNotFoundError("No module named 'hoptune._C'", name="hoptune._C"), "is not built"),
            (ImportError("libcudart.so.13: cannot open shared object file"), "installed but failed to load"),
        ):
            finder = Refuse(error)
            sys.meta_path.insert(0, finder)
            _lib._load.cache_clear()
            try:
                mod, why = _lib._load()
            finally:
                sys.meta_path.remove(finder)
            assert mod is None and want in why and str(error) in why, why
    finally:
        _lib._load.cache_clear()


def test_extension_built_for_a_newer_cuda_than_the_driver_is_not_used(monkeypatch):
    """hoptune._C links the CUDA runtime statically: it loads under an older driver, and then every
    kernel call fails (cudaErrorInsufficientDriver). Such a build is reported, with the versions
    and the fix, and the ops use the PyTorch reference; a newer driver (or none) keeps it."""
    import types

    from hoptune import _lib

    monkeypatch.setitem(sys.modules, "hoptune._C", types.ModuleType("hoptune._C"))
    monkeypatch.setattr(sys.modules["hoptune._C"], "CUDA_RUNTIME_VERSION", 13000, raising=False)
    driver = {"version": 12080}
    monkeypatch.setattr(_lib, "_driver_version", lambda: driver["version"], raising=False)
    _lib._load.cache_clear()
    try:
        assert _lib.extension() is None
        reason = _lib.unavailable_reason()
        assert reason is not None
        assert "built with CUDA 13.0" in reason and "supports CUDA up to 12.8" in reason, reason
        assert "update the driver" in reason and "CUDA 12 toolkit" in reason, reason
        monkeypatch.setattr(sys.modules["hoptune._C"], "CUDA_RUNTIME_VERSION", 12090)
        driver["version"] = 11080
        _lib._load.cache_clear()
        assert "built with CUDA 12.9" in _lib.unavailable_reason()
        assert "CUDA up to 11.8" in _lib.unavailable_reason()
        for version in (12020, 12100, None):  # an older or newer minor version of CUDA 12, no driver
            driver["version"] = version
            _lib._load.cache_clear()
            assert _lib.extension() is sys.modules["hoptune._C"], version
        monkeypatch.setattr(sys.modules["hoptune._C"], "CUDA_RUNTIME_VERSION", 13000)
        for version in (13020, None):  # a driver of CUDA 13 (another minor version), no driver at all
            driver["version"] = version
            _lib._load.cache_clear()
            assert _lib.extension() is sys.modules["hoptune._C"], version
    finally:
        _lib._load.cache_clear()


@pytest.mark.parametrize(
    ("value", "disabled"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("0", False),
        ("", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_disable_kernels_reads_false_as_false(monkeypatch, value, disabled):
    """HOPTUNE_DISABLE_KERNELS=false (a launcher's default, `${DISABLE:-false}`) keeps the kernels,
    as transformers reads its boolean variables: any value but 0 turned them off before."""
    from hoptune import _lib

    monkeypatch.setenv("HOPTUNE_DISABLE_KERNELS", value)
    _lib._disabled.cache_clear()
    try:
        assert _lib._disabled() is disabled
    finally:
        _lib._disabled.cache_clear()


def test_dispatch_checks_trace_under_compile_without_cache_warnings():
    """The checks every op makes (the extension loaded, the kernels not disabled) run inside a
    compiled model: torch.compile traces them without its warning on functools' cache wrappers."""
    import warnings

    import torch

    from hoptune import _lib

    def f(x):
        on = _lib.extension() is not None and not _lib._disabled()
        return x + 1 if on else x - 1

    expected = f(torch.ones(2))  # (the first, eager call loads the extension: not traced)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    torch._dynamo.reset()
    assert torch.equal(y, expected)
    assert not [w for w in caught if "cache" in str(w.message)], [str(w.message) for w in caught]


def test_cuda_version_reads_cudas_encoding():
    """CUDA's version numbers (1000 * major + 10 * minor) read as major.minor in the messages,
    minor versions of two digits among them."""
    from hoptune import _lib

    assert _lib._cuda_version(12080) == "12.8"
    assert _lib._cuda_version(12100) == "12.10"
    assert _lib._cuda_version(13000) == "13.0"


@pytest.mark.parametrize("value", [" 0 ", "false\n", " 1", "yes "])
def test_disable_kernels_reads_a_value_with_spaces_around_it(monkeypatch, value):
    """HOPTUNE_DISABLE_KERNELS is read with surrounding whitespace dropped (a value from a file or
    a YAML block), as transformers reads its boolean variables."""
    from hoptune import _lib

    monkeypatch.setenv("HOPTUNE_DISABLE_KERNELS", value)
    _lib._disabled.cache_clear()
    try:
        assert _lib._disabled() is (value.strip() in ("1", "yes"))
    finally:
        _lib._disabled.cache_clear()


def test_disabled_kernels_take_the_reference_on_cuda_silently(monkeypatch):
    """With HOPTUNE_DISABLE_KERNELS set, a CUDA tensor (stood in here) takes the PyTorch reference
    without the warning meant for a GPU the kernels do not support."""
    import warnings

    from hoptune import _lib

    class OnGPU:  # stands for a CUDA tensor on an sm_90 GPU (this test runs without one)
        is_cuda = True

        def get_device(self):
            return 0

    monkeypatch.setattr(_lib, "_warned", set())
    monkeypatch.setattr(_lib, "_disabled", lambda: True)
    monkeypatch.setattr(_lib, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(_lib.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _lib.use_kernel(OnGPU(), "nf4_dequantize")
    assert not caught, [str(w.message) for w in caught]


def test_warn_once_warns_once_per_key(monkeypatch):
    """warn_once warns the first time a key is seen, not again for it; another key warns."""
    import warnings

    from hoptune import _lib

    monkeypatch.setattr(_lib, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in ("a", "a", "b", "a"):
            _lib.warn_once(key, f"message {key}")
    assert [str(w.message) for w in caught] == ["message a", "message b"]


def test_dtype_codes_match_the_kernels_enum():
    """The dtype codes the ops pass to the kernels are those of csrc's DType enum (fp32 0, fp16
    1, bf16 2): a swap would have the kernels read bf16 as fp16."""
    import pathlib

    import torch

    from hoptune import _lib

    header = pathlib.Path(__file__).parents[1] / "csrc/include/hoptune/common/check.h"
    enum = re.search(r"enum class DType : int \{([^}]*)\}", header.read_text()).group(1)
    codes = {name.strip(): int(v) for name, v in (item.split("=") for item in enum.split(","))}
    assert _lib.DTYPE_CODES == {
        torch.float32: codes["kFloat32"],
        torch.float16: codes["kFloat16"],
        torch.bfloat16: codes["kBFloat16"],
    }
