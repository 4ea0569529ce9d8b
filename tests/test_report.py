"""Result files of the allocation scripts (DESIGN §5): results.jsonl / results.csv."""

from __future__ import annotations

import csv
import json

from rdoq.report import append_results, read_results


def _row(
    method: str,
    target: float | None,
    mse: float,
    act: float | None = None,
    alloc: str | None = None,
) -> dict:
    label = f"{target:g}" if act is None else f"{target:g}_a{act:g}"
    return {
        "model": "m",
        "method": method,
        "target_bits": target,
        "act_target_bits": act,
        "out_mse": mse,
        "allocation": alloc or f"{method}/allocation_{label}.json",
        "fp_act_layers": ["head"],
    }


def test_rerun_replaces_rows_of_the_same_point_and_keeps_the_others(tmp_path):
    append_results(
        tmp_path,
        [_row("dp", 2, 1.0), _row("dp", 3, 0.5), _row("lg", 2, 1.1), _row("dp", 2, 0.9, act=8)],
    )
    # A re-run of dp at 3 bits, and a new point: one row per point, newest values.
    rows = append_results(tmp_path, [_row("dp", 3, 0.4)])
    rows = append_results(tmp_path, [_row("dp", 4, 0.2), _row("dp", 2, 0.8)])
    expect = [
        ("dp", 2, None, 0.8),
        ("dp", 3, None, 0.4),
        ("lg", 2, None, 1.1),
        ("dp", 2, 8, 0.9),
        ("dp", 4, None, 0.2),
    ]
    got = [(r["method"], r["target_bits"], r["act_target_bits"], r["out_mse"]) for r in rows]
    assert got == expect
    assert read_results(tmp_path / "results.jsonl") == rows
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["target_bits"], r["out_mse"]) for r in table] == [
        (m, str(t), str(e)) for m, t, _, e in expect
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.jsonl"]


def test_points_with_other_allocation_files_are_kept(tmp_path):
    # Re-evaluations of two allocation files of the same target are two points.
    append_results(tmp_path, [_row("eval:dp", 3, 1.0, alloc="/a/allocation_3.json")])
    rows = append_results(tmp_path, [_row("eval:dp", 3, 2.0, alloc="/b/allocation_3.json")])
    assert [r["out_mse"] for r in rows] == [1.0, 2.0]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["allocation"] for x in lines] == [
        "/a/allocation_3.json",
        "/b/allocation_3.json",
    ]
