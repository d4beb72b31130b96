"""The paper's tables (Markdown and CSV) and its trade-off figure (Sim(GT) against CP): published and measured rows.

Rows are methods, one table per subset (Table 1: single person; Table 2: multi-person,
also split into 2 and 3-4 people). Each table holds the paper's published rows (Tables 1a,
2a, 2b of arXiv 2510.14975v1, from ``paper_points.json``) and the measured rows in the same
columns and precision. The best value of each column is bold and the second underlined,
over published and measured rows together; CP is ranked only among methods whose Sim(GT)
passes the subset's gate (0.40 single, 0.35 multi), as in the paper: a method that draws
strangers has a low CP without being any good. The GT and Ref rows (the ground truth and
the reference scored as the output) are the metric's bounds: shown, never ranked or drawn.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from .aggregate import CP_GATES

PAPER_POINTS = Path(__file__).with_name("paper_points.json")
SUBSETS = ("single", "multi", "multi_2", "multi_3_4")
SUBSET_TITLES = {
    "single": "Table 1: single person",
    "multi": "Table 2: multi-person (2-4 people)",
    "multi_2": "Table 2a: 2 people",
    "multi_3_4": "Table 2b: 3-4 people",
}
# (summary key, header, higher is better, ranked)
COLUMNS = [
    ("sim_gt", "Sim(GT)↑", True, True),
    ("sim_ref", "Sim(Ref)", True, False),
    ("cp", "CP↓", False, True),
    ("bld", "Bld↓", False, True),
    ("clip_i", "CLIP-I↑", True, True),
    ("clip_t", "CLIP-T↑", True, True),
    ("aesthetic", "Aes↑", True, True),
    ("fid", "FID↓", False, True),
]
# a published row's key (the paper's column) -> the pack's metric (summary "table" key). The paper
# prints no FID; the pack measures no column the paper has not. A key missing from a row is an empty cell.
PAPER_KEYS = {
    "sim_gt": "sim_gt",
    "sim_ref": "sim_ref",
    "cp": "cp",
    "bld": "bld",
    "clip_i": "clip_i",
    "clip_t": "clip_t",
    "aes": "aesthetic",
    "fid": "fid",
}
# the range each value must lie in (cosines and CP are bounded; FID is a distance)
_RANGES = {
    "sim_gt": (-1.0, 1.0),
    "sim_ref": (-1.0, 1.0),
    "cp": (-1.0, 1.0),
    "bld": (-1.0, 1.0),
    "clip_i": (-1.0, 1.0),
    "clip_t": (-1.0, 1.0),
    "aes": (-math.inf, math.inf),
    "fid": (0.0, math.inf),
}


class PaperPointsError(ValueError):
    """A published-points file that cannot be used; the message names the file, the place and the fix."""


def _gate(subset: str) -> float:
    return CP_GATES["single" if subset == "single" else "multi"]


def _values(part: dict) -> dict:
    return {key: part.get("table", {}).get(key) for key, *_ in COLUMNS}


def table_rows(methods: dict[str, dict], subset: str, bounds: dict[str, dict] | None = None) -> list[dict]:
    """The measured rows: one per method (values ``None`` where not measured, the sample count),
    then the measured GT/Ref bound rows of ``bounds`` (summaries of the ground truth / reference scored as output)."""
    rows = []
    for group, bound in ((methods, False), (bounds or {}, True)):
        for name, summary in group.items():
            part = summary.get("subsets", {}).get(subset)
            if not part or not part.get("scored"):
                continue
            rows.append({"method": name, "n": part["scored"], "source": "measured", "bound": bound, **_values(part)})
    return rows


def published_rows(paper: dict | None, subset: str) -> list[dict]:
    """The paper's rows of a subset, in the pack's metric names (``None`` where the paper prints nothing)."""
    if not paper:
        return []
    bound_names = set(paper.get("bound_rows", ()))
    return [
        {
            "method": row["method"],
            "n": None,
            "source": "published",
            "bound": row["method"] in bound_names,
            **{key: row.get(key) for key, *_ in COLUMNS},
        }
        for row in paper["subsets"].get(subset, {}).get("rows", [])
    ]


def all_rows(methods: dict[str, dict], subset: str, paper: dict | None, bounds: dict | None = None) -> list[dict]:
    """Published methods, measured methods, then the bound rows (published, measured)."""
    published, measured = published_rows(paper, subset), table_rows(methods, subset, bounds)
    return (
        [r for r in published if not r["bound"]]
        + [r for r in measured if not r["bound"]]
        + [r for r in published if r["bound"]]
        + [r for r in measured if r["bound"]]
    )


def _ranks(rows: list[dict], key: str, higher: bool, subset: str) -> dict[int, int]:
    candidates = [(i, r[key]) for i, r in enumerate(rows) if r[key] is not None and not r.get("bound")]
    if key == "cp":
        candidates = [(i, v) for i, v in candidates if (rows[i]["sim_gt"] or 0.0) > _gate(subset)]
    order = sorted(candidates, key=lambda iv: -iv[1] if higher else iv[1])
    return {i: rank for rank, (i, _) in enumerate(order[:2])}


def _source_cell(row: dict, paper: dict | None, subset: str) -> str:
    if row["source"] == "published":
        table = (paper or {}).get("subsets", {}).get(subset, {}).get("table")
        return f"published ({table})" if table else "published"
    return "measured"


def markdown_tables(
    methods: dict[str, dict], subsets=SUBSETS, paper: dict | None = None, bounds: dict[str, dict] | None = None
) -> str:
    out = []
    citation = (paper or {}).get("citation", "the --paper-points file")
    for subset in subsets:
        rows = all_rows(methods, subset, paper, bounds)
        if not rows:
            continue
        out += [
            f"### {SUBSET_TITLES[subset]}",
            "",
            "| Method | source | " + " | ".join(h for _, h, *_ in COLUMNS) + " | samples |",
            "|---|---|" + "---:|" * (len(COLUMNS) + 1),
        ]
        ranks = {key: _ranks(rows, key, higher, subset) if ranked else {} for key, _, higher, ranked in COLUMNS}
        for i, row in enumerate(rows):
            cells = []
            for key, *_ in COLUMNS:
                value = row[key]
                text = "" if value is None else (f"{value:.2f}" if key == "fid" else f"{value:.3f}")
                rank = ranks[key].get(i)
                cells.append(f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text)
            samples = "" if row["n"] is None else str(row["n"])
            out.append(
                f"| {row['method']} | {_source_cell(row, paper, subset)} | " + " | ".join(cells) + f" | {samples} |"
            )
        notes = [
            f"CP is ranked among methods with Sim(GT) > {_gate(subset):.2f}; GT and Ref (the ground truth "
            "and the reference scored as the output) are the metric's bounds, not ranked. An empty cell: "
            "not published or not measured."
        ]
        part = (paper or {}).get("subsets", {}).get(subset, {})
        if part.get("rows"):
            notes.append(f"Published rows: {part.get('table', 'the published table')} of {citation}.")
        elif subset == "multi" and paper:
            notes.append("The paper has no table of 2-4 people together: its rows are in Tables 2a and 2b.")
        if part.get("note"):
            notes.append(part["note"])
        out += ["", " ".join(notes), ""]
    return "\n".join(out)


def csv_table(
    methods: dict[str, dict], subsets=SUBSETS, paper: dict | None = None, bounds: dict[str, dict] | None = None
) -> str:
    """One line per row and subset; ``source`` published/measured, ``kind`` method/bound; empty = no value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["subset", "method", *[key for key, *_ in COLUMNS], "samples", "source", "kind"])
    for subset in subsets:
        for row in all_rows(methods, subset, paper, bounds):
            writer.writerow(
                [
                    subset,
                    row["method"],
                    *["" if row[k] is None else f"{row[k]:.6g}" for k, *_ in COLUMNS],
                    "" if row["n"] is None else row["n"],
                    row["source"],
                    "bound" if row["bound"] else "method",
                ]
            )
    return buffer.getvalue()


# --------------------------------------------------------------------------- the published rows
def _number(value, key: str, where: str):
    low, high = _RANGES[key]
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        span = (
            "a finite number"
            if math.isinf(low) and math.isinf(high)
            else f"a number >= {low:g}"
            if math.isinf(high)
            else f"a number in [{low:g}, {high:g}]"
        )
        raise PaperPointsError(f"{where}: {key!r} must be {span} or null, got {value!r}")
    return float(value)


def _rows(raw, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise PaperPointsError(
            f"{where}: expected a list of rows {{method, {', '.join(PAPER_KEYS)}}}, got {type(raw).__name__}"
        )
    rows, seen = [], set()
    for i, row in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(row, dict):
            raise PaperPointsError(
                f"{here}: expected an object {{method, {', '.join(PAPER_KEYS)}}}, got {type(row).__name__}"
            )
        method = row.get("method")
        if not isinstance(method, str) or not method.strip():
            raise PaperPointsError(f"{here}: 'method' must be a non-empty name")
        here = f"{here} ({method})"
        if method in seen:
            raise PaperPointsError(f"{here}: method listed twice in this table")
        seen.add(method)
        unknown = sorted(set(row) - set(PAPER_KEYS) - {"method"})
        if unknown:
            raise PaperPointsError(f"{here}: unknown column(s) {unknown}; allowed: method, {', '.join(PAPER_KEYS)}")
        values = {PAPER_KEYS[key]: _number(row.get(key), key, here) for key in PAPER_KEYS}
        if all(v is None for v in values.values()):
            raise PaperPointsError(f"{here}: no value in any column")
        rows.append({"method": method, **values})
    return rows


def load_paper_points(path: str | Path | None = None) -> dict:
    """The published rows, validated: ``subsets`` -> {table, caption, note, rows (pack metric names)}, ``ablation``.

    A subset is ``{"table": ..., "rows": [...]}`` or, as in earlier files, the list of rows itself.
    Raises :class:`PaperPointsError` (one line: file, place, what to do) on anything malformed.
    """
    path = Path(path) if path is not None else PAPER_POINTS
    hint = "" if path == PAPER_POINTS else " (fix the file, or leave --paper-points out for the paper's tables)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PaperPointsError(f"{path}: no such file{hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PaperPointsError(f"{path}: not readable JSON ({exc}){hint}") from None
    try:
        if not isinstance(data, dict) or not isinstance(data.get("subsets"), dict):
            raise PaperPointsError(
                "expected an object with a 'subsets' mapping of subset -> {table, rows: [{method, sim_gt, cp, ...}]}"
            )
        unknown = sorted(set(data["subsets"]) - set(SUBSETS))
        if unknown:
            raise PaperPointsError(f"subsets: unknown subset(s) {unknown}; allowed: {', '.join(SUBSETS)}")
        subsets = {}
        for subset, raw in data["subsets"].items():
            entry = {"rows": raw} if isinstance(raw, list) else raw
            if not isinstance(entry, dict) or "rows" not in entry:
                raise PaperPointsError(f"subsets.{subset}: expected {{table, rows: [...]}} or a list of rows")
            subsets[subset] = {
                **{k: v for k, v in entry.items() if k != "rows"},
                "rows": _rows(entry["rows"], f"subsets.{subset}.rows"),
            }
        out = {**data, "subsets": subsets}
        if "ablation" in data:
            if not isinstance(data["ablation"], dict) or "rows" not in data["ablation"]:
                raise PaperPointsError("ablation: expected {table, rows: [...]}")
            out["ablation"] = {**data["ablation"], "rows": _rows(data["ablation"]["rows"], "ablation.rows")}
        bound = data.get("bound_rows", [])
        if not isinstance(bound, list) or not all(isinstance(b, str) for b in bound):
            raise PaperPointsError('bound_rows: expected a list of row names (e.g. ["GT", "Ref"])')
    except PaperPointsError as exc:
        raise PaperPointsError(f"{path}: {exc}{hint}") from None
    return out


def fit_tradeoff(points: list[tuple[float, float]]) -> np.ndarray | None:
    """Polynomial Sim(GT) = f(CP) through the given (cp, sim_gt) points: quadratic from 4 points when it is
    concave (a trade-off that saturates), else a straight line (e.g. Table 2b, where GPT's outlier would
    bend a quadratic upwards)."""
    if len(points) < 2:
        return None
    cp, sim = np.array(points).T
    if len(points) >= 4:
        coeffs = np.polyfit(cp, sim, 2)
        if coeffs[0] <= 0:
            return coeffs
    return np.polyfit(cp, sim, 1)


def tradeoff_figure(
    methods: dict[str, dict],
    path: str | Path,
    paper: dict | None = None,
    panels=("single", "multi_2", "multi_3_4"),
    dpi: int = 100,
) -> dict[str, dict]:
    """Sim(GT) (y) against CP (x), one panel per subset: every published method and every measured one.

    The curve is fitted to the paper's points of the other methods (not WithAnyone), as the
    paper's Figure 5. The GT/Ref bound rows (CP -1 / +1) are not drawn. Returns per panel how
    many points of each kind were drawn.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("tradeoff.png needs matplotlib: pip install matplotlib (or -r requirements-dev.txt)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = paper if paper is not None else load_paper_points()
    own = paper.get("own_method", "WithAnyone")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    drawn = {}
    for ax, subset in zip(axes[0], panels):
        published = [
            r
            for r in published_rows(paper, subset)
            if not r["bound"] and r["cp"] is not None and r["sim_gt"] is not None
        ]
        ours = [
            (r["method"], r["cp"], r["sim_gt"])
            for r in table_rows(methods, subset)
            if r["cp"] is not None and r["sim_gt"] is not None
        ]
        others = [(p["cp"], p["sim_gt"]) for p in published if p["method"] != own]
        coeffs = fit_tradeoff(others)
        if coeffs is not None:
            xs = np.linspace(min(c for c, _ in others) - 0.05, max(c for c, _ in others) + 0.05, 100)
            ax.plot(xs, np.polyval(coeffs, xs), "--", color="0.55", label="trade-off fit (paper, other methods)")
        table = paper.get("subsets", {}).get(subset, {}).get("table")
        for k, p in enumerate(published):
            mine = p["method"] == own
            ax.scatter(
                p["cp"],
                p["sim_gt"],
                marker="D" if mine else "o",
                facecolors="none",
                edgecolors="tab:red" if mine else "0.4",
                zorder=2,
                label=(f"published ({table})" if table else "published") if k == 0 else None,
            )
            ax.annotate(
                p["method"], (p["cp"], p["sim_gt"]), fontsize=6, color="0.35", xytext=(3, 3), textcoords="offset points"
            )
        for name, cp, sim in ours:
            ax.scatter(cp, sim, marker="*", s=120, zorder=3, label=f"{name} (measured)")
            ax.annotate(name, (cp, sim), fontsize=8, xytext=(4, -9), textcoords="offset points")
        ax.set_title(SUBSET_TITLES[subset])
        ax.set_xlabel("copy-paste CP (lower is better)")
        ax.set_ylabel("Sim(GT) (higher is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.2)
        if published or ours:
            ax.legend(fontsize=7, loc="best")
        drawn[subset] = {"paper": len(published), "methods": len(ours), "curve": coeffs is not None}
    fig.text(
        0.01, 0.01, f"published points: {paper.get('citation', 'the --paper-points file')}", fontsize=7, color="0.4"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return drawn
