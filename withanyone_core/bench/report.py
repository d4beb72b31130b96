"""The paper's tables (Markdown and CSV) and its trade-off figure (Sim(GT) against CP) from summaries.

Rows are methods, one table per subset (Table 1: single person; Table 2: multi-person,
also split into 2 and 3-4 people). The best value of each column is bold and the second
underlined; CP is ranked only among methods whose Sim(GT) passes the subset's gate
(0.40 single, 0.35 multi), as in the paper: a method that draws strangers has a low CP
without being any good.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .aggregate import CP_GATES

PAPER_POINTS = Path(__file__).with_name("paper_points.json")
SUBSET_TITLES = {"single": "Table 1: single person", "multi": "Table 2: multi-person (2-4 people)",
                 "multi_2": "Table 2a: 2 people", "multi_3_4": "Table 2b: 3-4 people"}
# (summary key, header, higher is better, ranked)
COLUMNS = [("sim_gt", "Sim(GT)↑", True, True), ("sim_ref", "Sim(Ref)", True, False), ("cp", "CP↓", False, True),
           ("bld", "Bld↓", False, True), ("clip_i", "CLIP-I↑", True, True), ("clip_t", "CLIP-T↑", True, True),
           ("aesthetic", "Aes↑", True, True), ("fid", "FID↓", False, True)]


def _gate(subset: str) -> float:
    return CP_GATES["single" if subset == "single" else "multi"]


def table_rows(methods: dict[str, dict], subset: str) -> list[dict]:
    """One row per method: the table's values (``None`` where not measured) and the sample count."""
    rows = []
    for name, summary in methods.items():
        part = summary.get("subsets", {}).get(subset)
        if not part or not part.get("scored"):
            continue
        row = {"method": name, "n": part["scored"]}
        for key, *_ in COLUMNS:
            row[key] = part.get("table", {}).get(key)
        rows.append(row)
    return rows


def _ranks(rows: list[dict], key: str, higher: bool, subset: str) -> dict[int, int]:
    candidates = [(i, r[key]) for i, r in enumerate(rows) if r[key] is not None]
    if key == "cp":
        candidates = [(i, v) for i, v in candidates if (rows[i]["sim_gt"] or 0.0) > _gate(subset)]
    order = sorted(candidates, key=lambda iv: -iv[1] if higher else iv[1])
    return {i: rank for rank, (i, _) in enumerate(order[:2])}


def markdown_tables(methods: dict[str, dict], subsets=("single", "multi", "multi_2", "multi_3_4")) -> str:
    out = []
    for subset in subsets:
        rows = table_rows(methods, subset)
        if not rows:
            continue
        out += [f"### {SUBSET_TITLES[subset]}", "",
                "| Method | " + " | ".join(h for _, h, *_ in COLUMNS) + " | samples |",
                "|---|" + "---:|" * (len(COLUMNS) + 1)]
        ranks = {key: _ranks(rows, key, higher, subset) if ranked else {} for key, _, higher, ranked in COLUMNS}
        for i, row in enumerate(rows):
            cells = []
            for key, *_ in COLUMNS:
                value = row[key]
                text = "-" if value is None else (f"{value:.2f}" if key == "fid" else f"{value:.3f}")
                rank = ranks[key].get(i)
                cells.append(f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text)
            out.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['n']} |")
        out += ["", f"CP is ranked among methods with Sim(GT) > {_gate(subset):.2f}.", ""]
    return "\n".join(out)


def csv_table(methods: dict[str, dict], subsets=("single", "multi", "multi_2", "multi_3_4")) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["subset", "method", *[key for key, *_ in COLUMNS], "samples"])
    for subset in subsets:
        for row in table_rows(methods, subset):
            writer.writerow([subset, row["method"], *["" if row[k] is None else f"{row[k]:.6g}" for k, *_ in COLUMNS],
                             row["n"]])
    return buffer.getvalue()


def load_paper_points(path: str | Path | None = None) -> dict:
    data = json.loads(Path(path or PAPER_POINTS).read_text())
    if "subsets" not in data:
        raise ValueError(f"{path}: expected a 'subsets' mapping of subset -> [{{method, sim_gt, cp}}]")
    return data


def fit_tradeoff(points: list[tuple[float, float]]) -> np.ndarray | None:
    """Polynomial Sim(GT) = f(CP) through the given (cp, sim_gt) points: quadratic from 4 points, else a line."""
    if len(points) < 2:
        return None
    cp, sim = np.array(points).T
    return np.polyfit(cp, sim, 2 if len(points) >= 4 else 1)


def tradeoff_figure(methods: dict[str, dict], path: str | Path, paper: dict | None = None,
                    panels=("single", "multi_2", "multi_3_4"), dpi: int = 100) -> dict[str, dict]:
    """Sim(GT) (y) against CP (x) for every method given, over the paper's points, one panel per subset.

    The curve is fitted to the paper's points of the other methods (not WithAnyone), as the
    paper's Figure 5. Returns per panel how many points of each kind were drawn.
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
        published = [p for p in paper["subsets"].get(subset, []) if p.get("cp") is not None and p.get("sim_gt") is not None]
        ours = [(r["method"], r["cp"], r["sim_gt"]) for r in table_rows(methods, subset)
                if r["cp"] is not None and r["sim_gt"] is not None]
        others = [(p["cp"], p["sim_gt"]) for p in published if p["method"] != own]
        coeffs = fit_tradeoff(others)
        if coeffs is not None:
            xs = np.linspace(min(c for c, _ in others) - 0.05, max(c for c, _ in others) + 0.05, 100)
            ax.plot(xs, np.polyval(coeffs, xs), "--", color="0.55", label="trade-off fit (paper, other methods)")
        for k, p in enumerate(published):
            ax.scatter(p["cp"], p["sim_gt"], marker="o", facecolors="none", edgecolors="0.4",
                       label="published (paper_points.json)" if k == 0 else None)
            ax.annotate(p["method"], (p["cp"], p["sim_gt"]), fontsize=7, color="0.35", xytext=(3, 3),
                        textcoords="offset points")
        for name, cp, sim in ours:
            ax.scatter(cp, sim, marker="*", s=120, zorder=3, label=name)
            ax.annotate(name, (cp, sim), fontsize=8, xytext=(4, -9), textcoords="offset points")
        ax.set_title(SUBSET_TITLES[subset])
        ax.set_xlabel("copy-paste CP (lower is better)")
        ax.set_ylabel("Sim(GT) (higher is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.2)
        if published or ours:
            ax.legend(fontsize=7, loc="best")
        drawn[subset] = {"paper": len(published), "methods": len(ours), "curve": coeffs is not None}
    if not paper.get("verified_against_paper", False):
        fig.text(0.01, 0.01, "paper points: see withanyone_core/bench/paper_points.json for their source",
                 fontsize=7, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return drawn
