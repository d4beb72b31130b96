"""The paper's published rows (Tables 1a, 2a, 2b, 3 of arXiv 2510.14975v1) as the pack's data, their
validation, and how tables.md/.csv place them beside measured rows (no models needed)."""

import csv
import io
import json
import os
from pathlib import Path

import pytest

from support.needs import missing
from withanyone_core import bench_eval
from withanyone_core.bench.report import PAPER_POINTS, PaperPointsError, csv_table, load_paper_points, markdown_tables

REPO = Path(__file__).resolve().parents[2]
TABLES = {"single": "table1a_single_person", "multi_2": "table2a_two_people", "multi_3_4": "table2b_three_four_people"}


def _shared_tables() -> Path | None:
    """The project's transcription of the paper (../shared/paper/ beside the main checkout), when present."""
    roots = [REPO.parent]
    git = REPO / ".git"
    if git.is_file() and git.read_text().startswith("gitdir:"):  # a worktree: beside the main checkout
        roots.append(Path(git.read_text().split(":", 1)[1].strip()).parents[2].parent)
    for root in roots:
        path = root / "shared" / "paper" / "multiid_bench_tables.json"
        if path.is_file():
            return path
    return None


def test_pack_rows_equal_the_transcribed_paper_tables():
    shared = _shared_tables()
    if shared is None:
        missing("../shared/paper/multiid_bench_tables.json is not beside this checkout")
    paper = json.loads(shared.read_text())["tables"]
    ours = json.loads(PAPER_POINTS.read_text())  # the file as shipped, keys as the paper names its columns
    for subset, table in TABLES.items():
        assert ours["subsets"][subset]["rows"] == paper[table]["rows"], subset
    assert ours["ablation"]["rows"] == paper["table3_ablation"]["rows"]


def test_shipped_rows_every_method_and_the_bounds():
    data = load_paper_points()
    rows = {s: {r["method"]: r for r in data["subsets"][s]["rows"]} for s in data["subsets"]}
    assert set(rows) == {"single", "multi_2", "multi_3_4"}
    assert [data["subsets"][s]["table"] for s in ("single", "multi_2", "multi_3_4")] == [
        "Table 1a",
        "Table 2a",
        "Table 2b",
    ]
    assert len(rows["single"]) == 17 and len(rows["multi_2"]) == 9 and len(rows["multi_3_4"]) == 9
    assert (rows["single"]["GT"]["sim_gt"], rows["single"]["GT"]["cp"], rows["single"]["Ref"]["cp"]) == (
        1.0,
        -0.999,
        0.999,
    )
    assert rows["single"]["WithAnyone"]["aesthetic"] == 4.783  # the paper's "aes" is the pack's aesthetic
    assert all(r["fid"] is None for s in rows.values() for r in s.values())  # the paper prints no FID
    assert all(r["bld"] is None for r in rows["single"].values())  # nor a single-person Bld
    full = next(r for r in data["ablation"]["rows"] if r["method"] == "Full Setting")
    withanyone = rows["multi_2"]["WithAnyone"]
    assert all(full[k] == withanyone[k] for k in ("sim_gt", "sim_ref", "cp", "clip_i", "clip_t", "aesthetic"))
    assert "OmniGen" in data["subsets"]["multi_3_4"]["note"]
    assert data["bound_rows"] == ["GT", "Ref"] and data["citation"] == "arXiv 2510.14975v1"


def _summary(subset, n=3, **table):
    return {"subsets": {subset: {"scored": n, "table": table}}}


def test_tables_place_published_and_measured_rows_in_the_same_columns_and_rank_them_together():
    paper = load_paper_points()
    methods = {
        # the best Sim(GT) of Table 1a's rows and the lowest CP, but FID/CLIP not measured
        "mine": _summary("single", sim_gt=0.5, sim_ref=0.6, cp=0.1, bld=None, fid=12.345),
        # a lower CP still, below the 0.40 gate: not ranked on CP
        "stranger": _summary("single", sim_gt=0.2, sim_ref=0.2, cp=0.01),
    }
    bounds = {"GT": _summary("single", sim_gt=1.0, sim_ref=0.5, cp=-1.0)}
    text = markdown_tables(methods, paper=paper, bounds=bounds)
    single = text.split("### Table 2")[0]
    lines = {
        line.split(" | ")[0][2:] + "/" + line.split(" | ")[1]: line
        for line in single.splitlines()
        if line.startswith("| ") and not line.startswith("| Method")
    }
    assert len([k for k in lines if k.endswith("/published (Table 1a)")]) == 17
    mine = lines["mine/measured"]
    assert mine == "| mine | measured | **0.500** | 0.600 | **0.100** |  |  |  |  | **12.35** | 3 |"
    assert lines["stranger/measured"].split(" | ")[4] == "0.010"  # CP below the gate: not bold
    # the paper's own rows lose their marks to better measured ones; the second best is underlined
    assert lines["InstantID/published (Table 1a)"].split(" | ")[2] == "<u>0.464</u>"
    assert lines["WithAnyone/published (Table 1a)"].split(" | ")[4] == "<u>0.144</u>"
    # bounds: shown, never ranked (GT's Sim(GT) 1 is not bold); the measured one follows the published
    assert (
        lines["GT/published (Table 1a)"] == "| GT | published (Table 1a) | 1.000 | 0.521 | -0.999 |  |  |  |  |  |  |"
    )
    assert lines["GT/measured"].split(" | ")[2] == "1.000"
    order = [k for k in lines]
    assert order.index("mine/measured") < order.index("GT/published (Table 1a)") < order.index("GT/measured")
    assert "Published rows: Table 1a of arXiv 2510.14975v1." in single
    assert "The paper has no table of 2-4 people together" not in text  # no measured multi row: no Table 2
    assert "### Table 2a: 2 people" in text and "### Table 2b: 3-4 people" in text
    assert "possibly an error in the paper's table" in text.split("### Table 2b")[1]

    rows = list(csv.DictReader(io.StringIO(csv_table(methods, paper=paper, bounds=bounds))))
    by = {(r["subset"], r["method"], r["source"]): r for r in rows}
    assert by[("single", "InstantID", "published")]["aesthetic"] == "5.255"
    assert by[("single", "mine", "measured")]["fid"] == "12.345" and by[("single", "mine", "measured")]["clip_i"] == ""
    assert by[("single", "GT", "measured")]["kind"] == "bound" and by[("single", "UMO", "published")]["samples"] == ""
    assert len(rows) == 17 + 9 + 9 + 3


BAD = [
    ("{not json", "not readable JSON"),
    ('["a list"]', "expected an object with a 'subsets' mapping"),
    ('{"subsets": {"singel": []}}', "unknown subset(s) ['singel']; allowed: single, multi, multi_2, multi_3_4"),
    ('{"subsets": {"single": {"table": "1a"}}}', "subsets.single: expected {table, rows: [...]}"),
    ('{"subsets": {"single": [{"sim_gt": 0.4}]}}', "subsets.single.rows[0]: 'method' must be a non-empty name"),
    (
        '{"subsets": {"single": [{"method": "A", "cp": "0.3"}]}}',
        "subsets.single.rows[0] (A): 'cp' must be a number in [-1, 1] or null, got '0.3'",
    ),
    ('{"subsets": {"single": [{"method": "A", "cp": 1.3}]}}', "'cp' must be a number in [-1, 1]"),
    (
        '{"subsets": {"single": [{"method": "A", "sim_gt": NaN}]}}',
        "'sim_gt' must be a number in [-1, 1] or null, got nan",
    ),
    ('{"subsets": {"single": [{"method": "A", "fid": -2}]}}', "'fid' must be a number >= 0 or null"),
    (
        '{"subsets": {"single": [{"method": "A", "aesthetic": 5}]}}',
        "(A): unknown column(s) ['aesthetic']; allowed: method, sim_gt, sim_ref, cp, bld, clip_i, clip_t, aes, fid",
    ),
    (
        '{"subsets": {"single": [{"method": "A", "cp": 0.1}, {"method": "A", "cp": 0.2}]}}',
        "rows[1] (A): method listed twice",
    ),
    ('{"subsets": {"single": [{"method": "A"}]}}', "(A): no value in any column"),
    ('{"subsets": {"single": [{"method": "A", "cp": true}]}}', "'cp' must be a number in [-1, 1] or null, got True"),
    ('{"subsets": {}, "ablation": {"rows": [{"method": "B", "cp": 7}]}}', "ablation.rows[0] (B): 'cp'"),
    ('{"subsets": {}, "bound_rows": "GT"}', "bound_rows: expected a list of row names"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_a_malformed_replacement_file_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "points.json"
    path.write_text(text)
    with pytest.raises(PaperPointsError) as err:
        load_paper_points(path)
    line = str(err.value)
    assert message in line and line.startswith(f"{path}: ") and "\n" not in line
    assert line.endswith("(fix the file, or leave --paper-points out for the paper's tables)")


def test_cli_refuses_a_bad_paper_points_file_before_scoring(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    for path, fragment in (
        (tmp_path / "missing.json", "missing.json: no such file"),
        (tmp_path / "bad.json", "'cp' must be a number in [-1, 1]"),
    ):
        if path.name == "bad.json":
            path.write_text('{"subsets": {"single": [{"method": "A", "cp": 2}]}}')
        with pytest.raises(SystemExit) as stop:  # the face models (absent here) are never reached
            bench_eval.main([str(results), "--insightface", str(tmp_path / "none"), "--paper-points", str(path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --paper-points: ") and fragment in err and "buffalo_l" not in err


def test_a_replacement_in_the_earlier_list_form_replaces_the_shipped_rows(tmp_path):
    path = tmp_path / "points.json"
    path.write_text(
        json.dumps(
            {
                "citation": "my notes",
                "subsets": {
                    "single": [{"method": "Other", "sim_gt": 0.45, "cp": 0.2}],
                    "multi_3_4": [{"method": "Other", "sim_gt": 0.3}],
                },
            }
        )
    )
    paper = load_paper_points(path)
    text = markdown_tables({}, paper=paper)
    assert "| Other | published | **0.450** |" in text and "DreamO" not in text
    assert "Published rows: the published table of my notes." in text
    assert "### Table 2a" not in text and "### Table 2b: 3-4 people" in text
    out = tmp_path / "report"
    combined = bench_eval.write_report({}, out, path)
    assert combined["figure"]["single"] == {"paper": 1, "methods": 0, "curve": False}
    assert (out / "tradeoff.png").stat().st_size > 0 and os.path.getsize(out / "tables.csv") > 0


def test_trade_off_curve_is_concave_or_a_line():
    from withanyone_core.bench.report import fit_tradeoff, published_rows

    paper = load_paper_points()
    for subset, degree in (("single", 2), ("multi_2", 2), ("multi_3_4", 1)):  # 2b: GPT would bend it upwards
        points = [
            (r["cp"], r["sim_gt"])
            for r in published_rows(paper, subset)
            if not r["bound"] and r["method"] != "WithAnyone"
        ]
        coeffs = fit_tradeoff(points)
        assert len(coeffs) == degree + 1 and (degree == 1 or coeffs[0] <= 0), subset
    assert (
        fit_tradeoff([(0.1, 0.3)]) is None and len(fit_tradeoff([(0.1, 0.3), (0.2, 0.4), (0.3, 0.6), (0.4, 0.9)])) == 2
    )
