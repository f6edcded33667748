"""ddpm_fast.bench_report: pytest-benchmark JSON -> markdown speedup table + PNG chart.

Most tests build a small JSON by hand in pytest-benchmark's format (known medians, so the speedups
are known); one runs a real two-provider benchmark through benchmarks/conftest.py's run_bench in a
subprocess, so the report is also checked against the format the plugin actually writes.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_fast import cli
from ddpm_fast.testing.bench_report import family, load_results, make_report, parse_entries

REPO = Path(__file__).resolve().parents[1]


def _bench(group, provider, median_s, *, params=None, extra=None, name=None):
    params = {"provider": provider, **(params or {})}
    pid = "-".join(str(v) for v in params.values())
    base = name or "test_op"
    info = {"provider": provider, "timer": "wall clock (pytest-benchmark median)", "device": "cpu"}
    info.update(extra or {})
    return {
        "group": group, "name": f"{base}[{pid}]", "fullname": f"benchmarks/bench_op.py::{base}[{pid}]",
        "params": params, "param": pid, "extra_info": info, "options": {},
        "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s, "stddev": 0.0,
                  "rounds": 5, "median": median_s, "iqr": median_s * 0.1, "q1": median_s, "q3": median_s,
                  "ops": 1.0 / median_s, "total": 5 * median_s, "iterations": 1},
    }


def _results(benchmarks):
    return {
        "machine_info": {
            "node": "box", "machine": "x86_64", "python_version": "3.11.7",
            "cpu": {"brand_raw": "Generic CPU", "count": 2},
            "ddpm_fast": {"torch": "2.13.0+cpu", "triton": "3.9.0", "cuda": None, "gpu": None,
                          "cpu_model": "Test EPYC 9999", "cpu_count": 2, "torch_threads": 2,
                          "triton_interpret": "1"},
        },
        "commit_info": {"id": "0123456789abcdef0123", "branch": "main", "dirty": True},
        "benchmarks": benchmarks,
        "datetime": "2026-11-26T12:00:00+00:00",
        "version": "5.2.3",
    }


def _write(tmp_path, data, name="results.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.fixture
def sample_json(tmp_path):
    benches = [
        # A: every provider; fast 5x the reference, 2.5x the quickest compiled provider.
        _bench("A", "reference", 10e-3, extra={"TFLOP/s": 1.0, "peak_mem_bytes": 3 << 20,
                                              "kernels_per_step": 650.25}),
        _bench("A", "compiled", 6e-3),
        _bench("A", "compiled-max-autotune", 5e-3),
        _bench("A", "fast", 2e-3, extra={"TFLOP/s": 5.0, "peak_mem_bytes": 1 << 20, "kernels_per_step": 330}),
        # B: the fast path is slower (0.5x), at a quarter of a plain copy's bandwidth.
        _bench("B", "reference", 4e-3),
        _bench("B", "fast", 8e-3, extra={"GB/s": 12.5}),
        _bench("B", "copy", 1e-3, extra={"GB/s": 50.0}),
        # C: fast skipped (missing provider).
        _bench("C", "reference", 1e-3),
        # D: only fast.
        _bench("D", "fast", 1e-3),
        # E: a fast-path variant with another name is a candidate of its own.
        _bench("E", "reference", 2e-3),
        _bench("E", "fast", 1e-3),
        _bench("E", "table", 1e-4),
        # F: another named baseline; the quickest of its family is the bar.
        _bench("F", "reference", 4e-3),
        _bench("F", "sdpa", 2e-3),
        _bench("F", "sdpa-graph", 1e-3),
        _bench("F", "fast", 2e-3),
        # G: a Triton-interpreter run (the JSON says TRITON_INTERPRET=1): flagged, not averaged.
        _bench("G", "sdpa", 1e-5),
        _bench("G", "triton", 2e-2),
        # No group set: derived from the parameters minus the provider; the CUDA-event median in
        # extra_info wins over the wall-clock stats.median.
        _bench(None, "reference", 1.0, params={"shape": "7x9"}, name="test_ungrouped",
               extra={"median_ms": 3.0}),
        _bench(None, "fast", 1.0, params={"shape": "7x9"}, name="test_ungrouped", extra={"median_ms": 1.0}),
    ]
    return _write(tmp_path, _results(benches))


def _rows(md, case):
    """The summary rows of `case` as {column header: cell}, one dict per provider row."""
    found, header = [], None
    for line in md.splitlines():
        if line.startswith("| case |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith(f"| {case} |") and header:
            found.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")])))
        elif line.startswith("## All measurements"):
            break
    return found


def _row(md, case):
    rows = _rows(md, case)
    assert len(rows) == 1, f"expected one summary row for {case!r}, got {rows}"
    return rows[0]


def test_report_speedups_and_metadata(sample_json, tmp_path):
    pytest.importorskip("matplotlib")
    md_path, png_path = make_report(sample_json, tmp_path / "out")
    assert md_path == tmp_path / "out" / "results.md"
    md = md_path.read_text()
    for text in ("Test EPYC 9999", "2 cores", "torch 2.13.0+cpu", "triton 3.9.0", "CUDA none",
                 "2026-11-26T12:00:00", "0123456789ab", "uncommitted changes", "![speedups](results.png)"):
        assert text in md, text
    a = _row(md, "A")
    assert (a["provider"], a["median"], a["reference"], a["vs reference"]) == ("fast", "2.00 ms", "10.00 ms", "5.00x")
    assert a["compiled (best)"] == "5.00 ms (compiled-max-autotune)" and a["vs compiled"] == "2.50x"
    assert a["throughput"] == "5 TFLOP/s" and a["peak mem ref / this"] == "3.0 MiB / 1.0 MiB"
    assert a["kernels/step ref / this"] == "650 / 330" and _row(md, "B")["kernels/step ref / this"] == "—"
    b = _row(md, "B")
    assert b["vs reference"] == "0.50x" and b["vs compiled"] == "—" and b["throughput"] == "12.5 GB/s"
    assert b["% of copy BW"] == "25%"  # the copy is a ceiling, not a candidate: B has one row
    c = _row(md, "C")
    assert c["provider"] == "missing" and c["vs reference"] == "—" and c["note"] == "no fast-path provider"
    d = _row(md, "D")
    assert d["reference"] == "—" and d["vs reference"] == "—" and d["note"] == "no reference"
    assert [r["provider"] for r in _rows(md, "E")] == ["fast", "table"]
    f = _row(md, "F")
    assert f["baseline (best)"] == "1.00 ms (sdpa-graph)" and f["vs baseline"] == "0.50x"
    g = _row(md, "G")
    assert g["provider"] == "triton" and "Triton interpreter" in g["note"]
    u = _row(md, "test_ungrouped[7x9]")
    assert u["reference"] == "3.00 ms" and u["median"] == "1.00 ms" and u["vs reference"] == "3.00x"
    # per test function and provider, the geometric mean over its cases (A, B, E, F: 5, 0.5, 2, 2)
    assert (f"`fast`: vs reference {(5 * 0.5 * 2 * 2) ** 0.25:.2f}x, vs compiled 2.50x, vs baseline 0.50x."
            in md)
    assert "`fast`: vs reference 3.00x." in md  # test_ungrouped
    assert "`table`: vs reference 20.00x." in md
    assert "`triton`" not in md  # interpreter rows are not averaged
    assert png_path == tmp_path / "out" / "results.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_matplotlib(monkeypatch):
    """As if matplotlib were not installed: every `import matplotlib...` raises ImportError."""
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)  # a loaded submodule would import despite the parent
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_report_without_matplotlib(sample_json, tmp_path, no_matplotlib):
    md_path, png_path = make_report(sample_json, tmp_path)
    assert png_path is None and not (tmp_path / "results.png").exists()
    md = md_path.read_text()
    assert "No chart: matplotlib is not installed" in md and "![speedups]" not in md
    assert _row(md, "A")["vs reference"] == "5.00x"  # the tables do not depend on matplotlib


def test_chart_without_any_pair(tmp_path):
    """Only references (the fast path not written yet): still a chart, of median times."""
    pytest.importorskip("matplotlib")
    p = _write(tmp_path, _results([_bench("A", "reference", 1e-3), _bench("B", "reference", 2e-3)]))
    md_path, png_path = make_report(p, tmp_path)
    assert png_path is not None and png_path.stat().st_size > 1000
    assert _row(md_path.read_text(), "A")["provider"] == "missing"


def test_default_out_dir_and_note(sample_json, no_matplotlib):
    md_path, _ = make_report(sample_json, note="Shared machine: timings are noisy.")
    assert md_path.parent == sample_json.parent
    assert "> Shared machine: timings are noisy." in md_path.read_text()


def test_family():
    assert family("reference") == "reference"
    assert family("compiled") == family("compiled-max-autotune") == "compiled"
    assert family("sdpa") == family("sdpa-graph") == family("reference-graph") == "baseline"
    assert family("copy") == "bound"
    assert family("fast") == family("fast-compiled") == family("triton") == family("table") == "fast"


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "not pytest-benchmark output"),
    ('{"machine_info": {}}', "not pytest-benchmark output"),
    ('{"benchmarks": []}', "holds no benchmarks"),
    ('{"benchmarks": [{"name": "test_x[fast]", "stats": {"mean": 1.0}}]}', r"test_x\[fast\].*stats.median"),
    ('{"benchmarks": [7]}', "not a JSON object"),
], ids=["syntax", "list", "no-benchmarks", "empty", "no-median", "not-object"])
def test_bad_input(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        make_report(p, tmp_path)
    assert not (tmp_path / "bad.md").exists()


@pytest.mark.parametrize("provider, stats, extra, match", [
    ("fast", {"median": 0.0}, {}, r"benchmark 'test_op\[fast\]': stats\.median is 0\.0, not a finite time > 0"),
    ("fast", {"median": -1e-3}, {}, r"'test_op\[fast\]': stats\.median is -0\.001"),
    ("reference", {"median": 0.0}, {}, r"'test_op\[reference\]': stats\.median is 0\.0"),
    ("fast", {"median": float("nan")}, {}, r"stats\.median is nan"),
    ("fast", {}, {"median_ms": 0}, r"extra_info\.median_ms is 0, not a finite time > 0"),  # a CUDA-event median
    ("fast", {"min": -1e-3}, {}, r"stats\.min is -0\.001"),
    ("fast", {"iqr": -1e-4}, {}, r"stats\.iqr is -0\.0001, not a finite time >= 0"),
], ids=["zero", "negative", "zero-reference", "nan", "zero-median_ms", "negative-min", "negative-iqr"])
def test_bad_times(tmp_path, provider, stats, extra, match):
    """A time that is not a finite number > 0 is bad input naming its benchmark: not a division by zero,
    nor a report of negative or zero times and speedups."""
    benches = [_bench("A", p, 1e-3, extra=extra if p == provider else None) for p in ("reference", "fast")]
    benches[("reference", "fast").index(provider)]["stats"].update(stats)
    p = _write(tmp_path, _results(benches))
    with pytest.raises(ValueError, match=match):
        make_report(p, tmp_path)
    assert not (tmp_path / "results.md").exists()


def test_zero_spread_and_unused_stats_are_accepted(tmp_path, no_matplotlib):
    """An IQR of 0 is a real result (one round, or identical rounds); the rounds' min and IQR next to
    a CUDA-event median are not shown, so they are not checked either."""
    fast = _bench("A", "fast", 1e-3, extra={"median_ms": 0.5})
    fast["stats"].update(min=-1.0, iqr="?")
    ref = _bench("A", "reference", 2e-3)
    ref["stats"]["iqr"] = 0.0
    md_path, _ = make_report(_write(tmp_path, _results([ref, fast])), tmp_path)
    assert _row(md_path.read_text(), "A")["vs reference"] == "4.00x"


@pytest.mark.parametrize("name, content", [
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    ("deep.json", '{"benchmarks": [' + "[" * 100_000 + "]" * 100_000 + "]}"),
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
], ids=["top", "inside-benchmarks", "jsonl-row"])
def test_deeply_nested_json(tmp_path, name, content):
    """Nesting deeper than Python's recursion limit is a file that cannot be read, not a RecursionError."""
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match=rf"{name}.*nested too deeply"):
        load_results(p)


@pytest.mark.parametrize("blocked", ["results.md", "results.png"])
def test_write_failure_leaves_no_partial_report(sample_json, tmp_path, blocked):
    """A destination that cannot be written (here a directory in its way) gives an error naming it,
    not its temporary file, and leaves no chart without its markdown and no temporary file."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    (out / blocked).mkdir(parents=True)
    with pytest.raises(OSError, match="cannot write") as info:
        make_report(sample_json, out)
    assert repr(str(out / blocked)) in str(info.value) and ".tmp" not in str(info.value)
    assert [p.name for p in out.iterdir()] == [blocked]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not a file"):
        load_results(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="bin.json"):
        load_results(tmp_path / "bin.json")


def test_cli_entry_points(sample_json, tmp_path, capsys, no_matplotlib):
    assert cli.main(["bench-report", str(sample_json), "--out-dir", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "results.md" in out and "matplotlib is not installed" in out
    assert (tmp_path / "cli" / "results.md").exists()

    def error_line(argv, match):
        # A user error is one line with the prefix and exit status of every other command.
        assert cli.main(["bench-report", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match("ddpm-fast: error: " + match, err), err

    error_line([str(tmp_path / "missing.json")], ".*does not exist")
    # Bad times, too-deep nesting and an unwritable destination.
    zero = _write(tmp_path, _results([_bench("A", "reference", 1e-3), _bench("A", "fast", 1e-3)]), "zero.json")
    zero.write_text(zero.read_text().replace('"median": 0.001', '"median": 0.0'))
    error_line([str(zero)], r"benchmark 'test_op\[\w+\]': stats\.median is 0\.0")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    error_line([str(tmp_path / "deep.json")], ".*deep.json.*nested too deeply")
    (tmp_path / "cli" / "results.md").unlink()
    (tmp_path / "cli" / "results.md").mkdir()
    error_line([str(sample_json), "--out-dir", str(tmp_path / "cli")], "cannot write .*results.md")


_BENCH_FILE = '''
import pytest
import torch
from conftest import run_bench

X = torch.randn(256, 256)


@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_sum(benchmark, provider):
    fn = (lambda: X.sum()) if provider == "reference" else (lambda: X.view(-1).sum())
    out = run_bench(benchmark, fn, nbytes=X.numel() * 4, rounds=3, memory=True)
    assert torch.allclose(out, X.sum())
'''


def test_real_pytest_benchmark_json(tmp_path):
    """run_bench -> pytest-benchmark JSON -> report, end to end (benchmarks/conftest.py's hooks,
    bench_*.py collection, groups, provider and machine info all as the real suite makes them)."""
    shutil.copy(REPO / "benchmarks" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_sum.py").write_text(_BENCH_FILE)
    out_json = tmp_path / "real.json"
    # A clean pytest: under pytest-xdist the worker's PYTEST_XDIST_* variables would make
    # pytest-benchmark disable itself in the child too.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["DDPM_FAST_BENCH_JSONL"] = str(tmp_path / "rows.jsonl")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(tmp_path), "--benchmark-only", f"--benchmark-json={out_json}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert {b["extra_info"]["provider"] for b in data["benchmarks"]} == {"reference", "fast"}
    assert {b["group"] for b in data["benchmarks"]} == {"test_sum"}
    assert all(b["extra_info"]["peak_mem_bytes"] >= 0 and b["extra_info"]["GB/s"] > 0
               for b in data["benchmarks"])
    md_path, _ = make_report(out_json, tmp_path)
    md = md_path.read_text()
    row = _row(md, "test_sum")
    assert row["provider"] == "fast" and row["vs reference"].endswith("x")
    assert "torch " + data["machine_info"]["ddpm_fast"]["torch"] in md
    # The same results, appended row by row as they were measured (what survives a cut-off run),
    # read back by the report: same providers, groups and medians as the final JSON.
    from_rows = parse_entries(load_results(tmp_path / "rows.jsonl"))
    final = {(e.group, e.provider): e.median_s for e in parse_entries(data)}
    assert {(e.group, e.provider): e.median_s for e in from_rows} == pytest.approx(final)
    md_rows, _ = make_report(tmp_path / "rows.jsonl", tmp_path / "from_rows")
    assert "torch " + data["machine_info"]["ddpm_fast"]["torch"] in md_rows.read_text()
