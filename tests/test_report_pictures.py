"""The evaluation's terminal tables fit 120 columns, and no text of its pictures overlaps another.

Runs on the committed records (docs/results) and on crowded synthetic ones:
many frontier settings within a few percent of each other, 1 to 30 heatmap
settings, slots with replicas. Overlap is measured on what matplotlib
actually draws: every non-empty text's box in display pixels.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from megatron_capaware.tools import report  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def committed(name: str) -> List[Dict[str, Any]]:
    return json.loads((RESULTS / name).read_text())


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("name", ["reference_eval.json", "reference_eval_ep4.json", "fine_64x8_eval_ep8.json"])
def test_terminal_tables_of_the_committed_records_fit_120_columns(name) -> None:
    records = committed(name)
    for text in (report.format_table(records), report.format_placement(records)):
        widths = [len(line) for line in text.splitlines()]
        assert max(widths, default=0) <= report.TERMINAL_WIDTH, (name, max(widths))
    table = report.format_table(records)
    # The short labels stand for the full ones (results.md keeps those), and every row is there.
    assert len(table.splitlines()) >= len(records) + 2
    assert report.short_label(records[-1]["label"]) in table


def test_decode_table_fits_120_columns() -> None:
    records = committed("decode/decode_ep2_b16.json")
    text = report.format_decode_table(records)
    assert text and max(len(line) for line in text.splitlines()) <= report.TERMINAL_WIDTH
    assert "active_max" in text


def test_a_table_wider_than_the_limit_cuts_the_label_column_not_the_figures() -> None:
    records = [{"label": "capacity-reroute(gamma=1.25,drop=weight,rounds=3,rho=0.25,policy=weight-aware,"
                         f"unit=rank,local) @placed:placement-ep64-r128-variant{i}.json",
                "ppl": 123456.789, "delta_ppl_pct": 99999.5, "accuracy": 0.5, "i_agg": 123.456,
                "rank_imbalance": 64.0, "rank_peak_load": 64.0, "predicted_speedup": 1000.5,
                "balancedness": 0.01, "dropped_frac": 0.999, "rerouted_frac": 12.5} for i in range(3)]
    text = report.format_table(records)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= report.TERMINAL_WIDTH
    assert "123456.789" in text and "1000.500x" in text and "~" in lines[2]
    assert max(len(line) for line in report.format_table(records, width=None).splitlines()) > 120


def test_short_labels() -> None:
    cases = {
        "topk": "topk",
        "capacity-drop(gamma=1.25)": "drop(g1.25)",
        "capacity-reroute(gamma=1,drop=weight,rounds=1)": "reroute(g1,w)",
        "capacity-reroute(gamma=1,rounds=2,rho=0.5)": "reroute(g1,r2,rho=0.5)",
        "expanded-drop(gamma=2)": "xdrop(g2)",
        "laser(eps=0.6,t_fix=0.5,pool=2k)": "laser(e0.6,t0.5,p2k)",
        "laser(calibrated)": "laser(cal)",
        "capacity-drop(gamma=1,drop=weight,unit=rank) @placed:placement-ep2-r2.json": "drop(g1,w,rank)@ep2-r2",
        "topk @placed:placement-ep4-r4.json,round-robin": "topk@ep4-r4,rr",
    }
    assert {label: report.short_label(label) for label in cases} == cases


def test_results_md_keeps_the_full_labels_beside_the_short_ones(tmp_path) -> None:
    records = committed("reference_eval.json")
    report.write_outputs(records, tmp_path, plots=False)
    md = (tmp_path / "results.md").read_text()
    for record in records:
        assert f"| {record['label']} | {report.short_label(record['label'])} |" in md
    assert "Short labels:" in md


# --------------------------------------------------------------------------- overlap


@pytest.fixture
def drawn_texts(monkeypatch):
    """Calls ``draw(fig)`` -> the display boxes of every non-empty text matplotlib drew."""
    def draw(fig) -> List[Any]:
        boxes: List[Any] = []
        original = Text.draw

        def recording(self, renderer):
            original(self, renderer)
            if self.get_visible() and self.get_text().strip():
                # Text's own box (an Annotation's would include its leader line).
                boxes.append((self.get_text(), Text.get_window_extent(self, renderer)))

        monkeypatch.setattr(Text, "draw", recording)
        try:
            fig.canvas.draw()
        finally:
            monkeypatch.setattr(Text, "draw", original)
        return boxes
    return draw


def overlaps(boxes, tolerance: float = 0.5) -> List[str]:
    """Pairs of texts whose boxes intersect by more than ``tolerance`` pixels each way."""
    out = []
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        if (min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > tolerance
                and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > tolerance):
            out.append(f"{a!r} / {b!r}")
    return out


def frontier_records(n: int) -> List[Dict[str, Any]]:
    """``n`` frontier settings packed into 1.10-1.30x and 0-1.5 % (plus top-k, some dominated, one far off)."""
    recs = [{"label": "topk", "router": "topk", "predicted_speedup": 1.0, "delta_ppl_pct": 0.0, "ppl": 10.0}]
    for i in range(n):
        x = 1.10 + 0.2 * i / max(1, n - 1)
        recs.append({"label": f"capacity-drop(gamma={1 + i / 100:g},drop=weight,unit=rank)", "router": "capacity-drop",
                     "config": {"drop_policy": "weight"}, "predicted_speedup": x,
                     "delta_ppl_pct": 1.5 * (i / max(1, n - 1)) ** 2, "ppl": 10.0})
        recs.append({"label": f"capacity-reroute(gamma={1 + i / 100:g},rounds=1)", "router": "capacity-reroute",
                     "predicted_speedup": x - 0.01, "delta_ppl_pct": 2.0 + i / 10, "ppl": 10.0})
    recs.append({"label": "laser(calibrated)", "router": "laser", "predicted_speedup": 1.05, "delta_ppl_pct": 40.0,
                 "ppl": 10.0})
    for r in recs:
        r["ppl"] = 10.0 * (1 + r["delta_ppl_pct"] / 100)
    report.mark_frontier(recs)
    return recs


@pytest.mark.parametrize("source", ["reference_eval.json", "reference_eval_ep4.json", 3, 25])
def test_frontier_labels_do_not_overlap(source, drawn_texts) -> None:
    records = committed(source) if isinstance(source, str) else frontier_records(source)
    fig = report.frontier_figure(records)
    try:
        boxes = drawn_texts(fig)
        front = [r for r in records if r["frontier"] == "yes"]
        labelled = [text for text, _ in boxes if text.endswith("%") and "x  " in text]
        assert len(labelled) == len(front) >= 1, "every frontier setting has its callout"
        assert overlaps(boxes) == []
    finally:
        plt.close(fig)


def heatmap_records(n: int, ep: int = 2, experts: int = 8, redundant: int = 0, layers: int = 4):
    recs = []
    for i in range(n):
        loads = {str(l): [float((7 * e + 3 * l + i) % 11 + 1) for e in range(experts)] for l in range(1, layers + 1)}
        rec = {"label": f"capacity-reroute(gamma={1 + i / 10:g},drop=weight,rounds=2,unit=rank)",
               "router": "capacity-reroute", "i_agg": 1.5, "rank_peak_load": 1.1, "ep": ep, "expert_loads": loads}
        if redundant:  # E = 8, R = 2 over 2 ranks: experts 6 and 1 twice, the ranks swapped in even layers
            assert (experts, redundant, ep) == (8, 2, 2)
            one, two = [0, 1, 2, 3, 6], [4, 5, 6, 7, 1]
            table = {l: (one + two if int(l) % 2 else two + one) for l in loads}
            slots = {l: [loads[l][e] / table[l].count(e) for e in table[l]] for l in loads}
            rec.update(slot_experts=table, slot_loads=slots, placement={"plan": "p.json"},
                       label=rec["label"] + " @placed:placement-ep2-r2.json")
        recs.append(rec)
    return recs


@pytest.mark.parametrize("n, experts, ep", [(1, 8, 2), (5, 8, 2), (13, 8, 2), (30, 8, 2), (7, 64, 8)])
def test_heatmap_texts_and_panels_do_not_overlap(n, experts, ep, drawn_texts) -> None:
    figures = report.heatmap_figures(heatmap_records(n, ep=ep, experts=experts), per_page=12)
    try:
        if experts == 8:
            assert len(figures) == -(-n // 12)
        panels = 0
        for fig in figures:
            boxes = drawn_texts(fig)
            assert overlaps(boxes) == []
            page = fig.bbox
            assert all(page.x0 - 1 <= b.x0 and b.x1 <= page.x1 + 1 and page.y0 - 1 <= b.y0 and b.y1 <= page.y1 + 1
                       for _, b in boxes), "a text runs off the page"
            axes = _all_axes(fig)
            on_page = sum(1 for ax in axes if ax.get_label() != "<colorbar>") // 2
            assert 1 <= on_page <= 12 and fig.get_figheight() <= 20
            panels += on_page
            boxes = [ax.get_window_extent() for ax in axes]
            for a, b in itertools.combinations(boxes, 2):
                assert not (min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5)
        assert panels == n
    finally:
        for fig in figures:
            plt.close(fig)


def _all_axes(fig) -> List[Any]:
    out = list(fig.axes)
    for sub in getattr(fig, "subfigs", []):
        out += [ax for ax in _all_axes(sub) if ax not in out]
    return out


def test_heatmaps_group_physical_slots_by_rank_with_the_rank_loads(drawn_texts) -> None:
    (record,) = heatmap_records(1, ep=2, experts=8, redundant=2)
    view = report.slot_view(record)
    assert view["physical"] and view["ranks"] == 2 and view["loads"].shape == (4, 10)
    # Each rank's load is the sum of its slots'; replicas split their expert's load.
    for i, layer in enumerate(view["layers"]):
        slots = record["slot_loads"][layer]
        assert view["rank_loads"][i].tolist() == pytest.approx([sum(slots[:5]), sum(slots[5:])])
        assert sorted(set(view["experts"][i].tolist())) == list(range(8))
    (fig,) = report.heatmap_figures([record])
    try:
        texts = [t for t, _ in drawn_texts(fig)]
        assert "rank 0" in texts and "rank 1" in texts and "r0" in texts
        assert overlaps(drawn_texts(fig)) == []
    finally:
        plt.close(fig)


def test_heatmaps_write_one_file_per_page(tmp_path) -> None:
    paths = report.plot_load_heatmaps(heatmap_records(13), tmp_path / "expert_load_heatmaps.png", per_page=12)
    assert [p.name for p in paths] == ["expert_load_heatmaps.png", "expert_load_heatmaps_2.png"]
    assert all(p.stat().st_size > 0 for p in paths)


# --------------------------------------------------------------------------- callout spacing


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=30), st.floats(0.001, 0.05))
def test_spread_labels_keeps_order_spacing_and_bounds(wanted, gap) -> None:
    if (len(wanted) - 1) * gap > 1.0:
        with pytest.raises(ValueError):
            report.spread_labels(wanted, gap)
        return
    pos = report.spread_labels(wanted, gap)
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    ranked = [pos[i] for i in order]
    assert all(b - a >= gap - 1e-9 for a, b in zip(ranked, ranked[1:]))
    assert all(-1e-9 <= p <= 1 + 1e-9 for p in pos)
    # A label that has room stays where it was wanted.
    if len(wanted) == 1:
        assert pos[0] == min(max(wanted[0], 0.0), 1.0)


@pytest.mark.parametrize("source", ["reference_eval.json", 25])
def test_quality_balance_labels_do_not_overlap(source, drawn_texts) -> None:
    records = committed(source) if isinstance(source, str) else [
        dict(r, i_agg=1.0 + 0.01 * i, gamma=1 + i / 100) for i, r in enumerate(frontier_records(source))]
    fig = report.quality_balance_figure(records)
    try:
        boxes = drawn_texts(fig)
        assert overlaps(boxes) == []
        assert any(text in {"1", "1.25", "1.01"} for text, _ in boxes), "some gamma labels remain"
    finally:
        plt.close(fig)


def test_report_module_reprints_saved_records_and_refuses_other_files(tmp_path) -> None:
    import subprocess
    import sys

    run = lambda *argv: subprocess.run([sys.executable, "-m", "megatron_capaware.tools.report", *argv],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    assert "records" in run("--help").stdout
    ok = run(str(RESULTS / "reference_eval.json"), "--out", str(tmp_path / "out"), "--no-plots")
    assert ok.returncode == 0, ok.stderr
    assert max(len(line) for line in ok.stdout.splitlines()) <= report.TERMINAL_WIDTH
    assert "drop(g1,w,rank)@ep2-r2*" in ok.stdout and (tmp_path / "out" / "results.md").exists()
    (tmp_path / "bad.json").write_text('{"not": "records"}')
    for bad, fragment in ((tmp_path / "bad.json", "is not a list of evaluation records"),
                          (tmp_path / "missing.json", "cannot read")):
        result = run(str(bad))
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
