"""`ddpm-fast bench-report results.json`: pytest-benchmark JSON -> a markdown speedup table + a PNG chart.

Input: the file `pytest benchmarks/ --benchmark-only --benchmark-json=results.json` writes. Each
benchmark there belongs to a group (one case: an op at one shape and dtype, the UNet at one preset,
batch and dtype, ...) and names its provider in extra_info (benchmarks/conftest.py's run_bench does
both). Providers fall into families by name:
  reference            eager PyTorch, the spec: the baseline every speedup is measured against
  compiled*            the reference under torch.compile (the real bar on GPU)
  sdpa*, eager*, torch*, reference-*  another baseline a benchmark names (an SDPA block, the graphed reference)
  copy*, memcpy*       a bandwidth ceiling (a copy of the same bytes), not an implementation
  anything else        a fast-path variant (fast, fast-injected, fast-graph, triton, table, ...)

Output: <stem>.md, with the machine and software it came from, one summary row per group and
fast-path provider (speedup = baseline median time / its median time, so > 1 means the fast path is
faster; each baseline column uses the quickest provider of that family in the group; "% of copy
bandwidth" = its GB/s / the copy's GB/s) and every measurement in detail; and <stem>.png, a bar
chart of the speedups (needs matplotlib; without it the report says so and there is no PNG).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["make_report", "load_results"]

REFERENCE = "reference"
_OTHER_BASELINES = ("sdpa", "eager", "torch", "reference")  # "reference-graph" etc.: baselines
_BOUNDS = ("copy", "memcpy")


def _named(provider: str, prefixes) -> bool:
    return any(provider == p or provider.startswith(p + "-") or provider.startswith(p + "_") for p in prefixes)


def family(provider: str) -> str:
    """reference | compiled | baseline | bound | fast, from the provider's name (see the module doc)."""
    if provider == REFERENCE:
        return "reference"
    if _named(provider, ("compiled",)):
        return "compiled"
    if _named(provider, _OTHER_BASELINES):
        return "baseline"
    if _named(provider, _BOUNDS):
        return "bound"
    return "fast"


@dataclass
class Entry:
    """One benchmark of the JSON, reduced to what the report shows."""

    section: str  # the test function, e.g. bench_unet.py::test_unet_forward
    group: str
    provider: str
    median_s: float
    min_s: Optional[float]  # None when the median came from CUDA events, not from the rounds
    iqr_s: Optional[float]
    rounds: Optional[int]
    timer: str
    throughput: List[Tuple[str, float]] = field(default_factory=list)  # [(unit, value)], best first
    peak_mem: Optional[int] = None
    peak_mem_total: Optional[int] = None
    kernels_per_step: Optional[float] = None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_results(json_path) -> dict:
    """Read and validate a pytest-benchmark JSON file; clear errors for anything else."""
    path = Path(json_path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark results file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not a text file ({e})") from None
    try:
        data = _from_jsonl(text, path) if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    except RecursionError:  # json recurses once per level of [ or {: no results file nests this deep
        raise ValueError(f"{str(path)!r} is not a results file: its JSON is nested too deeply to read") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{str(path)!r} is not pytest-benchmark output (no 'benchmarks' list); write one with "
                         "`pytest benchmarks/ --benchmark-only --benchmark-json=FILE`")
    if not data["benchmarks"]:
        raise ValueError(f"{str(path)!r} holds no benchmarks (every benchmark skipped, or run with "
                         "--benchmark-disable?)")
    return data


def _from_jsonl(text: str, path: Path) -> dict:
    """The rows benchmarks/conftest.py appends under DDPM_FAST_BENCH_JSONL (one result per line, kept
    even when the run was cut off) in pytest-benchmark's layout. Only CUDA-event or wall-clock medians
    are there (extra_info median_ms), no rounds; the machine is what the rows recorded."""
    benchmarks, machine = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        extra = row.get("extra_info") if isinstance(row, dict) else None
        if not isinstance(extra, dict) or _num(extra.get("median_ms")) is None:
            raise ValueError(f"{str(path)!r} line {n} is not a benchmark row (no extra_info.median_ms)")
        machine = row.get("machine") if isinstance(row.get("machine"), dict) else machine
        benchmarks.append({"name": row.get("name"), "fullname": row.get("fullname") or row.get("name"),
                           "group": row.get("group"), "extra_info": extra,
                           "stats": {"median": extra["median_ms"] * 1e-3}})
    return {"benchmarks": benchmarks, "machine_info": {"ddpm_fast": machine}}


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _time(name: str, key: str, value, zero_ok: bool = False) -> Optional[float]:
    """A timing stat of benchmark `name`, None when not recorded; else a finite number > 0 (>= 0 for a spread):
    a zero or negative time is a broken measurement the speedups would divide by or show negated."""
    if value is None:
        return None
    x = _num(value)
    if x is None or x < 0 or (x == 0 and not zero_ok):
        raise ValueError(f"benchmark {name!r}: {key} is {value!r}, not a finite time "
                         f"{'>= 0' if zero_ok else '> 0'}")
    return x


def _entry(b: dict, index: int) -> Entry:
    if not isinstance(b, dict):
        raise ValueError(f"benchmark #{index} is not a JSON object")
    name = str(b.get("name") or b.get("fullname") or f"#{index}")
    stats = b.get("stats")
    if not isinstance(stats, dict) or stats.get("median") is None:
        raise ValueError(f"benchmark {name!r} has no stats.median")
    extra = b.get("extra_info") if isinstance(b.get("extra_info"), dict) else {}
    params = b.get("params") if isinstance(b.get("params"), dict) else {}
    provider = str(extra.get("provider") or params.get("provider") or "unknown")
    fullname = str(b.get("fullname") or name)
    section = fullname.split("[", 1)[0].split("/")[-1]
    group = b.get("group")
    if not group:  # no group set: the case is the test's parameters minus the provider
        rest = "-".join("-".join(map(str, v)) if isinstance(v, list) else str(v)
                        for k, v in params.items() if k != "provider")
        group = name.split("[", 1)[0] + (f"[{rest}]" if rest else "")
    # CUDA-event medians (run_bench's do_bench) are more precise than the synchronized wall clock.
    # min and IQR come from pytest-benchmark's rounds, so they are shown only next to its median.
    # median_ms is checked first: a .jsonl's stats.median came from it, so an error names what the file holds.
    median_ms = _time(name, "extra_info.median_ms", extra.get("median_ms"))
    stats_median = _time(name, "stats.median", stats["median"])
    from_stats = median_ms is None or math.isclose(median_ms * 1e-3, stats_median, rel_tol=1e-6)
    median_s = stats_median if from_stats else median_ms * 1e-3
    throughput = [(unit, _num(extra[unit])) for unit in ("images/s", "TFLOP/s", "GB/s")
                  if _num(extra.get(unit)) is not None]
    rounds = stats.get("rounds")
    return Entry(section=section, group=str(group), provider=provider, median_s=median_s,
                 min_s=_time(name, "stats.min", stats.get("min")) if from_stats else None,
                 iqr_s=_time(name, "stats.iqr", stats.get("iqr"), zero_ok=True) if from_stats else None,
                 rounds=int(rounds) if isinstance(rounds, int) else None,
                 timer=str(extra.get("timer") or "pytest-benchmark wall clock"), throughput=throughput,
                 peak_mem=int(extra["peak_mem_bytes"]) if _num(extra.get("peak_mem_bytes")) is not None else None,
                 peak_mem_total=(int(extra["peak_mem_total_bytes"])
                                 if _num(extra.get("peak_mem_total_bytes")) is not None else None),
                 kernels_per_step=_num(extra.get("kernels_per_step")))


def parse_entries(data: dict) -> List[Entry]:
    return [_entry(b, i) for i, b in enumerate(data["benchmarks"])]


def describe_machine(data: dict, entries: List[Entry]) -> Dict[str, str]:
    """Device, versions, date and commit, from machine_info/commit_info (and extra_info)."""
    mi = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    ours = mi.get("ddpm_fast") if isinstance(mi.get("ddpm_fast"), dict) else {}
    cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    cpu_model = ours.get("cpu_model") or cpu.get("brand_raw") or mi.get("processor") or "unknown CPU"
    cores = ours.get("cpu_count") or cpu.get("count")
    threads = ours.get("torch_threads")
    cpu_text = (f"{cpu_model}" + (f", {cores} cores" if cores else "")
                + (f", torch threads {threads}" if threads else ""))
    gpu = ours.get("gpu")
    if not gpu:  # older JSON without our machine_info: the per-benchmark device, if any names a GPU
        devices = {str(b["extra_info"].get("device")) for b in data["benchmarks"]
                   if isinstance(b, dict) and isinstance(b.get("extra_info"), dict)}
        devices.discard("None")
        devices.discard("cpu")
        gpu = ", ".join(sorted(devices)) or None
    ci = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    commit = str(ci.get("id") or "unknown")[:12]
    if ci.get("branch"):
        commit += f" ({ci['branch']})"
    if ci.get("dirty"):
        commit += ", uncommitted changes in the work tree"

    def ver(key):
        v = ours.get(key)
        return str(v) if v else ("none" if key in ours else "not recorded")

    return {
        "device": f"GPU: {gpu} (host CPU: {cpu_text})" if gpu else f"CPU: {cpu_text}",
        "kind": "gpu" if gpu else "cpu",
        "torch": ver("torch"), "triton": ver("triton"), "cuda": ver("cuda"),
        "python": str(mi.get("python_version") or "unknown"),
        "pytest-benchmark": str(data.get("version") or "unknown"),
        "date": str(data.get("datetime") or "unknown"),
        "commit": commit,
        "timers": "; ".join(sorted({e.timer for e in entries})),
    }


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One summary line: a group and one fast-path provider against its baselines."""

    section: str
    group: str
    fast: Optional[Entry]
    reference: Optional[Entry]
    compiled: Optional[Entry]  # the quickest compiled provider of the group
    baseline: Optional[Entry] = None  # the quickest other baseline (sdpa, ...)
    bound: Optional[Entry] = None  # the copy of the same bytes, when measured
    interpreted: bool = False  # a Triton-interpreter run: plumbing, not a timing

    def _vs(self, base: Optional[Entry]) -> Optional[float]:
        return base.median_s / self.fast.median_s if self.fast and base else None

    @property
    def vs_reference(self) -> Optional[float]:
        return self._vs(self.reference)

    @property
    def vs_compiled(self) -> Optional[float]:
        return self._vs(self.compiled)

    @property
    def vs_baseline(self) -> Optional[float]:
        return self._vs(self.baseline)

    @property
    def bandwidth_fraction(self) -> Optional[float]:
        mine = dict(self.fast.throughput if self.fast else [])
        ceiling = dict(self.bound.throughput if self.bound else [])
        return mine["GB/s"] / ceiling["GB/s"] if "GB/s" in mine and ceiling.get("GB/s") else None


def group_entries(entries: List[Entry]) -> Dict[Tuple[str, str], List[Entry]]:
    groups: Dict[Tuple[str, str], List[Entry]] = {}
    for e in entries:  # insertion order = the JSON's (pytest's parametrization) order
        groups.setdefault((e.section, e.group), []).append(e)
    return groups


def summary_rows(entries: List[Entry], triton_interpreted: bool = False) -> List[Row]:
    rows = []
    for (section, group), members in group_entries(entries).items():
        by_family: Dict[str, List[Entry]] = {}
        for e in members:
            by_family.setdefault(family(e.provider), []).append(e)

        def quickest(fam):
            return min(by_family.get(fam, []), key=lambda e: e.median_s, default=None)

        ref = by_family.get("reference", [None])[0]
        for fast in by_family.get("fast") or [None]:
            interp = bool(triton_interpreted and fast and "triton" in fast.provider)
            rows.append(Row(section, group, fast, ref, quickest("compiled"), quickest("baseline"),
                            quickest("bound"), interp))
    return rows


def geomean(values: List[float]) -> Optional[float]:
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e5:  # a day and more: 4 significant digits, never hundreds of them
        return f"{s:.4g} s"
    return f"{s:.2f} s"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "—"
    if abs(n) < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    if abs(n) < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def fmt_speedup(x: Optional[float]) -> str:
    return f"{x:.2f}x" if x is not None else "—"


def fmt_throughput(e: Optional[Entry]) -> str:
    if e is None or not e.throughput:
        return "—"
    unit, value = e.throughput[0]
    return f"{value:,.1f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


def _named_time(e: Optional[Entry]) -> str:
    return f"{fmt_time(e.median_s)} ({e.provider})" if e else "—"


def _note(r: Row) -> str:
    missing = [n for n, e in (("fast-path provider", r.fast), ("reference", r.reference)) if e is None]
    notes = (["no " + " or ".join(missing)] if missing else [])
    if r.interpreted:
        notes.append("ran in the Triton interpreter: plumbing, not a timing")
    return "; ".join(notes)


def _pair(attr: str, fmt: Callable[[Any], str]) -> Callable[[Row], str]:
    """A 'reference / this provider' cell of one Entry attribute (a dash when neither has it)."""
    def cell(r: Row) -> str:
        ref, mine = (getattr(e, attr) if e else None for e in (r.reference, r.fast))
        return "—" if ref is None and mine is None else f"{fmt(ref)} / {fmt(mine)}"
    return cell


# (header, cell, always shown)
def _fmt_kernels(n: Optional[float]) -> str:
    return "—" if n is None else f"{n:.0f}"


_SUMMARY_COLUMNS = [
    ("case", lambda r: r.group, True),
    ("provider", lambda r: r.fast.provider if r.fast else "missing", True),
    ("median", lambda r: fmt_time(r.fast.median_s if r.fast else None), True),
    ("reference", lambda r: fmt_time(r.reference.median_s if r.reference else None), True),
    ("vs reference", lambda r: fmt_speedup(r.vs_reference), True),
    ("compiled (best)", lambda r: _named_time(r.compiled), False),
    ("vs compiled", lambda r: fmt_speedup(r.vs_compiled), False),
    ("baseline (best)", lambda r: _named_time(r.baseline), False),
    ("vs baseline", lambda r: fmt_speedup(r.vs_baseline), False),
    ("throughput", lambda r: fmt_throughput(r.fast), False),
    ("% of copy BW", lambda r: f"{100 * r.bandwidth_fraction:.0f}%" if r.bandwidth_fraction else "—", False),
    ("peak mem ref / this", _pair("peak_mem", fmt_bytes), False),
    ("kernels/step ref / this", _pair("kernels_per_step", _fmt_kernels), False),
    ("note", _note, False),
]


def _table_dropping_empty(columns, rows) -> List[str]:
    """A table of (header, cell function, always shown) columns; optional all-empty columns left out."""
    cells = [[fn(r) for _, fn, _ in columns] for r in rows]
    keep = [i for i, (_, _, always) in enumerate(columns) if always or any(c[i] not in ("—", "") for c in cells)]
    return _table([columns[i][0] for i in keep], [[c[i] for i in keep] for c in cells])


_DETAIL_COLUMNS = [
    ("case", lambda e: f"{e.section} {e.group}", True),
    ("provider", lambda e: e.provider, True),
    ("median", lambda e: fmt_time(e.median_s), True),
    ("min", lambda e: fmt_time(e.min_s), False),
    ("IQR", lambda e: fmt_time(e.iqr_s), False),
    ("rounds", lambda e: str(e.rounds) if e.rounds is not None else "—", False),
    ("throughput", lambda e: ", ".join(f"{v:.4g} {u}" for u, v in e.throughput) or "—", False),
    ("peak mem", lambda e: fmt_bytes(e.peak_mem), False),
    ("peak mem total", lambda e: fmt_bytes(e.peak_mem_total), False),
    ("kernels/step", lambda e: _fmt_kernels(e.kernels_per_step), False),
]


def render_markdown(meta: Dict[str, str], entries: List[Entry], rows: List[Row], source: str,
                    chart_name: Optional[str], chart_note: Optional[str], note: Optional[str] = None) -> str:
    lines = [f"# Benchmark report ({meta['kind'].upper()})", ""]
    lines += [f"- Device: {meta['device']}",
              f"- Software: torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
              f"Python {meta['python']}, pytest-benchmark {meta['pytest-benchmark']}",
              f"- Date: {meta['date']}",
              f"- Commit: {meta['commit']}",
              f"- Source: `{source}` ({len(entries)} benchmarks)",
              f"- Timers: {meta['timers']}", ""]
    if note:
        lines += [f"> {note}", ""]
    lines += ["Speedup = baseline median time / the fast-path provider's median time (above 1x: the fast "
              "path is faster). Each baseline column uses the quickest provider of that kind in the case "
              "(compiled: torch.compile modes; baseline: another implementation a benchmark names, e.g. "
              "SDPA). \"% of copy BW\" = its GB/s over a plain copy's of the same bytes. A dash: not "
              "measured for the case (skipped, or not part of this run); empty columns are left out.", ""]
    if chart_name:
        lines += [f"![speedups]({chart_name})", ""]
    if chart_note:
        lines += [f"> {chart_note}", ""]

    sections: Dict[str, List[Row]] = {}
    for r in rows:
        sections.setdefault(r.section, []).append(r)
    lines += ["## Summary", ""]
    for section, srows in sections.items():
        lines += [f"### {section}", ""]
        for prov in dict.fromkeys(r.fast.provider for r in srows if r.fast and not r.interpreted):
            mine = [r for r in srows if r.fast and r.fast.provider == prov and not r.interpreted]
            parts = [f"vs {name} {fmt_speedup(gm)}" for name, gm in
                     (("reference", geomean([r.vs_reference for r in mine])),
                      ("compiled", geomean([r.vs_compiled for r in mine])),
                      ("baseline", geomean([r.vs_baseline for r in mine]))) if gm is not None]
            if parts:
                lines += [f"Geometric mean over the cases, `{prov}`: " + ", ".join(parts) + ".", ""]
        lines += _table_dropping_empty(_SUMMARY_COLUMNS, srows)
        lines.append("")

    lines += ["## All measurements", "",
              "Median and min over the timed rounds; IQR shows the spread (min and IQR are blank where the "
              "median came from CUDA events rather than the rounds). Peak memory: the working memory "
              "one call adds on top of what was live before it (see benchmarks/README.md); total = the "
              "absolute device peak (CUDA only).", ""]
    ordered = [e for members in group_entries(entries).values() for e in members]
    lines += _table_dropping_empty(_DETAIL_COLUMNS, ordered)
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------------------------
def make_chart(rows: List[Row], entries: List[Entry], meta: Dict[str, str], png_path: Path) -> bool:
    """Write the PNG to png_path; False when matplotlib is not installed. Speedup bars (log scale, 1x
    marked) when any fast/baseline pair exists, else each provider's median time per case."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False

    pairs = [r for r in rows if not r.interpreted and any(v is not None for v in
                                                          (r.vs_reference, r.vs_compiled, r.vs_baseline))]
    if pairs:
        labels = [f"{r.group} [{r.fast.provider}]" if r.fast.provider != "fast" else r.group for r in pairs]
        series = [("vs reference", [r.vs_reference for r in pairs], "#4C72B0"),
                  ("vs compiled (best)", [r.vs_compiled for r in pairs], "#DD8452"),
                  ("vs other baseline (best)", [r.vs_baseline for r in pairs], "#55A868")]
        xlabel = "speedup (baseline median / fast median), log scale; > 1 = fast path faster"
    else:
        groups = group_entries(entries)
        labels = [g for (_, g) in groups]
        providers = list(dict.fromkeys(e.provider for e in entries))
        colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
        series = [(p, [next((e.median_s * 1e3 for e in m if e.provider == p), None) for m in groups.values()],
                   colors[i % len(colors)]) for i, p in enumerate(providers)]
        xlabel = "median time (ms), log scale (no fast/baseline pair in these results)"
    series = [s for s in series if any(v is not None for v in s[1])]

    n = len(labels)
    # Each row's bars are centred on its label: only the series that row has take a slot.
    present = [[k for k, (_, values, _) in enumerate(series) if values[i] is not None] for i in range(n)]
    per_row = max((len(p) for p in present), default=1) or 1
    height = min(200.0, max(2.5, 0.22 * n * (1 + per_row) + 1.5))  # inches; Agg caps images at 2^16 px
    fig = Figure(figsize=(10, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bar_h = 0.8 / per_row
    for k, (name, values, color) in enumerate(series):
        ys, lefts, widths, shown_values = [], [], [], []
        for i, v in enumerate(values):
            if v is None:
                continue
            slot = present[i].index(k)
            ys.append(i + (slot - (len(present[i]) - 1) / 2) * bar_h)
            # Speedup bars grow from 1x, right for faster and left for slower (log scale).
            lefts.append(1.0 if pairs else 0.0)
            widths.append(v - 1.0 if pairs else v)
            shown_values.append(v)
        ax.barh(ys, widths, left=lefts, height=bar_h, label=name, color=color)
        for y, v in zip(ys, shown_values):
            right = v >= 1.0 or not pairs
            text = f"{v:.2f}x" if pairs else f"{v:.3g}"
            ax.text(v, y, " " + text if right else text + " ", va="center", ha="left" if right else "right",
                    fontsize=7)
    ax.set_xscale("log")
    shown = [v for _, values, _ in series for v in values if v]
    if pairs:
        ax.axvline(1.0, color="black", linewidth=0.8)
        shown.append(1.0)
    if shown:  # room for the value labels on both sides
        ax.set_xlim(min(shown) / 1.6, max(shown) * 1.6)
    # Plain tick labels (0.5, 1, 2, 5, ...) rather than powers of ten.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)  # first case on top, no empty margin
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(f"{meta['device']}\ntorch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
                 f"{meta['date'][:10]}, commit {meta['commit'].split(' ')[0]}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, format="png", dpi=110)
    return True


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def _writing(dest: Path, write: Callable[..., Any], *args):
    """write(*args), a step of writing dest through its temporary name: an OSError names dest itself."""
    try:
        return write(*args)
    except OSError as e:
        raise OSError(f"cannot write {str(dest)!r}: {e.strerror or e}") from None


def make_report(json_path, out_dir=None, note: Optional[str] = None) -> Tuple[Path, Optional[Path]]:
    """Write <stem>.md (and <stem>.png when matplotlib is installed) for a pytest-benchmark JSON.

    out_dir: where to write (default: the JSON's folder; created if missing). note: an optional
    sentence shown under the header (e.g. how noisy the machine was). Returns (markdown, png or None).
    """
    json_path = Path(json_path)
    data = load_results(json_path)
    entries = parse_entries(data)
    meta = describe_machine(data, entries)
    ours = data.get("machine_info", {}).get("ddpm_fast", {}) if isinstance(data.get("machine_info"), dict) else {}
    rows = summary_rows(entries, triton_interpreted=isinstance(ours, dict) and
                        str(ours.get("triton_interpret", "0")) == "1")
    out = Path(out_dir) if out_dir is not None else json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / (json_path.stem + ".md")
    png_path = out / (json_path.stem + ".png")
    # Both files are written to sibling temporary names (plain opens, not mkstemp, whose 0600 mode would
    # survive the rename) and only then renamed into place, so no reader sees half a file; the chart goes
    # first and is removed again if the markdown cannot follow: a failure leaves no chart without its report.
    md_tmp, png_tmp = (p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in (md_path, png_path))
    try:
        charted = _writing(png_path, make_chart, rows, entries, meta, png_tmp)
        chart_note = None if charted else (
            "No chart: matplotlib is not installed (`pip install matplotlib`, or the package's `plot` "
            "extra); the tables above and below hold every number.")
        text = render_markdown(meta, entries, rows, json_path.name, png_path.name if charted else None,
                               chart_note, note)
        _writing(md_path, md_tmp.write_text, text, "utf-8")
        if charted:
            _writing(png_path, os.replace, png_tmp, png_path)
        try:
            _writing(md_path, os.replace, md_tmp, md_path)
        except OSError:
            if charted:
                png_path.unlink()
            raise
    finally:
        for tmp in (md_tmp, png_tmp):
            tmp.unlink(missing_ok=True)
    return md_path, png_path if charted else None
