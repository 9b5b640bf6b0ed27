"""What a new user sees of ``import hoptune``: nothing printed, the README's names, a clean dir()."""

from __future__ import annotations

import subprocess
import sys

README_NAMES = ["load_model", "apply_lora", "save_adapter", "merge_and_unload", "plan", "quantize_nf4"]


def test_import_prints_nothing():
    """Not on stdout and not on stderr (no warning) for the package and its op, quant and nn parts."""
    code = "import hoptune, hoptune.ops, hoptune.quant, hoptune.nn, hoptune.cli"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr


def test_readme_names_exist_and_dir_lists_each_once():
    import hoptune

    for name in README_NAMES:
        assert callable(getattr(hoptune, name)), name
    names = dir(hoptune)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert set(README_NAMES) <= set(names)
