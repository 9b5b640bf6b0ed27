"""bench/README.md against bench/results/: every JSON it cites exists, and the tables of runs give
the ratios of the JSON each row names (the files are the measured record; the tables are read)."""

from __future__ import annotations

import json
import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(ROOT, "bench", "results")


def _readme() -> str:
    with open(os.path.join(ROOT, "bench", "README.md"), encoding="utf-8") as f:
        return f.read()


def _result(name: str) -> dict:
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        return json.load(f)


def _table(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header row starts with
    ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _cited(cell: str) -> str | None:
    m = re.search(r"`(?:results/)?([\w.-]+\.json)`", cell)
    return m.group(1) if m else None


def test_every_cited_result_file_exists():
    text = _readme()
    names = set(re.findall(r"`results/([\w.-]+\.json)`", text))
    names |= {n for n in re.findall(r"`([\w.-]+\.json)`", text)}
    assert names
    missing = sorted(n for n in names if not os.path.exists(os.path.join(RESULTS, n)))
    assert not missing, f"bench/README.md cites results that do not exist: {missing}"


def test_nf4_lora_table_of_runs_matches_each_runs_json():
    """Each run's interleaved / covered ratios at M = 8192 (forward on five shapes, layer on
    three) are its JSON's, or those of the fields a trial's row names (``_without_``,
    ``dx_last_``)."""
    rows = _table(_readme(), "| run | `results/` file |")
    assert len(rows) >= 35
    fwd = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
    layer = [(4096, 4096), (4096, 14336), (8192, 28672)]
    for row in rows:
        name = _cited(row[1])
        assert name, f"run {row[0]} names no JSON"
        d = _result(name)
        prefix, suffix = "", ""
        if "`_without_`" in row[1]:
            suffix = "_without_grads_kernel"
        if "`dx_last_*`" in row[1]:
            prefix = "dx_last_"
        f_rows = {(r["K"], r["N"]): r for r in d.get("forward", []) if r["M"] == 8192}
        l_rows = {(r["K"], r["N"]): r for r in d.get("layer", [])}
        want = []
        for shape in fwd:
            r = f_rows.get(shape)
            want.append(f"{r['ratio_interleaved']:.3f} / {r['ratio_covered']:.3f}" if r else "—")
        for shape in layer:
            r = l_rows.get(shape)
            if r is None:
                want.append("—")
                continue
            i, c = (f"{prefix}ratio_{k}{suffix}" for k in ("interleaved", "covered"))
            want.append(f"{r[i]:.3f} / {r[c]:.3f}")
        assert row[2:] == want, f"run {row[0]} ({name})"


def test_logprob_table_of_runs_names_each_runs_json_and_matches_it():
    """A row of the log-prob runs table names the JSON its ratios come from, and gives them: ours
    over the floor back to back, interleaved and over the random-gradient floor, at both V."""
    rows = _table(_readme(), "| run | V = 128256 | interleaved |")
    assert len(rows) >= 9
    keys = ("ours_over_floor", "ours_over_floor_interleaved", "ours_over_floor_randg_interleaved")
    for row in rows:
        name = _cited(row[0])
        assert name, f"log-prob run {row[0]!r} names no JSON"
        by_v = {r["V"]: r for r in _result(name)["rows"]}
        for v, cells in ((128256, row[1:4]), (151936, row[4:7])):
            for key, cell in zip(keys, cells):
                value = re.match(r"[\d.]*", cell).group(0)
                if key not in by_v[v]:
                    assert value == "", f"{name}: {key} at V = {v} is not in the JSON"
                    continue
                assert value == f"{by_v[v][key]:.3f}", f"{name}: {key} at V = {v}"


def test_sft_section_figures_are_the_json_s():
    """The SFT step's figures, and the Hugging Face stack's anchor measured in the same run, are
    sft_8b.json's."""
    text = _readme()
    section = " ".join(text[text.index("### QLoRA SFT step") :].split())  # (lines joined)
    d = _result("sft_8b.json")
    assert f"{d['median_step_s']:.3f} s" in section
    assert f"{d['tokens_per_s']:,.0f} tokens/s" in section
    assert f"peak {d['train_peak_gib']:.2f} GiB" in section
    assert f"{d['setup_peak_gib']:.1f} GiB" in section
    v = d["vs_anchor"]
    assert f"{v['anchor_tokens_per_s']:,.0f} tokens/s at {v['anchor_peak_gib']:.2f} GiB" in section
    assert f"{v['tokens_per_s_ratio']:.2f}x its tokens/s at {v['train_peak_ratio']:.2f}x its peak" in section
    step_ms = d["anchor"]["e2e_llama8b"]["bnb_qlora_step_ms"]
    assert f"a {step_ms:.0f} ms step" in section
    prof = _result("sft_8b_profile.json")
    assert f"median step took {prof['median_step_s']:.3f} s" in section
    assert f"{prof['profile']['device_busy_ms']:.1f} ms of kernels" in section
    for cat, ms in prof["profile"]["by_category_ms"].items():
        if ms >= 1.0:
            assert f"{ms:.1f} ms" in section, cat
    idle = prof["median_step_s"] * 1e3 - prof["profile"]["device_busy_ms"]
    assert f"about {idle:.0f} ms a step" in section


@pytest.mark.parametrize("name", sorted(os.listdir(RESULTS)))
def test_result_json_parses(name):
    if name.endswith(".json"):
        assert isinstance(_result(name), dict)
