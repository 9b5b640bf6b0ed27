import subprocess
import sys


def test_import_is_lean():
    """import hoptune (and its ops and quant packages) creates no CUDA context and no transformers import."""
    code = (
        "import sys, torch, hoptune, hoptune.ops, hoptune.quant\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialized at import'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported by import hoptune'\n"
        "assert 'hoptune._C' not in sys.modules, 'the extension was loaded at import'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lazy_attributes():
    import hoptune

    assert callable(hoptune.quantize_nf4)
    try:
        hoptune.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_unavailable_reason_is_explained():
    from hoptune import _lib

    reason = _lib.unavailable_reason()
    assert reason is None or len(reason) > 10
