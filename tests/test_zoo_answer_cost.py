"""The answer-stage cost benchmark (benchmarks/zoo_answer_cost.py) runs end to end on all three families."""

from __future__ import annotations

import json
from pathlib import Path

from vrp_utils.models import zoo


def test_answer_cost_benchmark_runs_and_reports_a_ratio_per_family(tiny_benchmark: Path, tmp_path: Path,
                                                                   benchmark_script) -> None:
    bench = benchmark_script("zoo_answer_cost")
    out = tmp_path / "cost.json"
    assert bench.main(["--steps", "1", "--images", "8", "--batch-size", "2", "--benchmark", str(tiny_benchmark), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["model"] for row in result["rows"]] == list(zoo.ZOO)
    for row in result["rows"]:
        assert row["naive_ms_per_decision"] > 0 and row["zoo_ms_per_decision"] > 0
        assert abs(row["ratio"] - row["naive_ms_per_decision"] / row["zoo_ms_per_decision"]) < 0.05
