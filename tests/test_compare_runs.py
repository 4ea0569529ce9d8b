"""benchmarks/compare_runs.py: the "behaviour unchanged" check between two runs."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.compare_runs import compare, main


def write_run(root, dist, row):
    (root / "layers").mkdir(parents=True)
    np.savez(root / "layers" / "a.npz", dist=dist, settings_digest=np.array(str(root)))
    (root / "results.jsonl").write_text(json.dumps(row) + "\n")


def test_equal_runs_differ_only_in_volatile_keys(tmp_path, capsys):
    row = {"method": "dp", "top1": 98.5, "created": "t0", "solve_s": 1.0}
    write_run(tmp_path / "a", np.array([1.0, np.nan]), row)
    write_run(tmp_path / "b", np.array([1.0, np.nan]), {**row, "created": "t1", "solve_s": 2.0})
    result = compare(tmp_path / "a", tmp_path / "b")
    assert result["differences"] == [] and result["arrays_equal"] == 1
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_changed_values_fail_and_additions_are_listed(tmp_path):
    row = {"method": "dp", "top1": 98.5}
    write_run(tmp_path / "a", np.array([1.0, 2.0]), row)
    write_run(tmp_path / "b", np.array([1.0, 2.0 + 1e-12]), {**row, "a_entropy_bits": 1.5})
    result = compare(tmp_path / "a", tmp_path / "b")
    assert result["differences"] == ["array dist of layers/a.npz"]
    assert result["keys_only_in_new"] == {"a_entropy_bits": 1}
    (tmp_path / "b" / "results.jsonl").write_text(json.dumps({"method": "dp", "top1": 97.0}))
    assert "content of results.jsonl" in compare(tmp_path / "a", tmp_path / "b")["differences"]
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
