"""The zoo learnability diagnostic (benchmarks/zoo_learnability.py) runs on all three families and its
symbolic control puts each category's word embedding on exactly the image tokens its box covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vrp_utils.data.benchmark import CATEGORIES
from vrp_utils.models import zoo


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_symbolic_image_tokens_carry_the_covering_categories(
    name: str, tiny_benchmark: Path, benchmark_script
) -> None:
    from PIL import Image

    diag = benchmark_script("zoo_learnability")
    model, processor, adapter = zoo.build_untrained(zoo.ZOO[name])
    inputs = adapter.build_inputs(processor, [Image.new("RGB", (64, 64), "white")], ["Is there a cup in the image?"])
    rows, cols = adapter.patch_grid(inputs, 0)
    cell = 64 // cols
    boxes = [{"category": "cup", "bbox": [0, 0, cell, cell]}, {"category": "tree", "bbox": [64 - cell, 64 - cell, 64, 64]}]
    covered = zoo.patch_categories(adapter, inputs, 0, (64, 64), boxes)
    assert covered.shape == (rows * cols, len(CATEGORIES))
    assert covered.sum() == 2
    assert covered[0, CATEGORIES.index("cup")] == 1 and covered[-1, CATEGORIES.index("tree")] == 1
    with torch.no_grad():
        embeds = diag.symbolic_embeddings(model, processor, adapter, inputs, [(64, 64)], [boxes])
        plain = model.get_input_embeddings()(inputs["input_ids"])
    positions = adapter.image_token_positions(inputs["input_ids"][0])
    cup = model.get_input_embeddings().weight[processor.tokenizer.convert_tokens_to_ids("cup")]
    torch.testing.assert_close(embeds[0, positions[0]] - plain[0, positions[0]], cup)
    untouched = torch.ones(embeds.shape[1], dtype=torch.bool)
    untouched[positions[0]] = untouched[positions[-1]] = False
    torch.testing.assert_close(embeds[0, untouched], plain[0, untouched])


@pytest.mark.parametrize("inputs", ["symbolic", "pixels"])
def test_diagnostic_runs_and_reports_accuracies(
    inputs: str, tiny_benchmark: Path, tmp_path: Path, benchmark_script
) -> None:
    diag = benchmark_script("zoo_learnability")
    out = tmp_path / "result.json"
    assert diag.main(["--model", "zoo-qwen2-vl", "--inputs", inputs, "--steps", "2", "--every", "1",
                      "--eval-size", "6", "--benchmark", str(tiny_benchmark), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [p["step"] for p in result["history"]] == [1, 2]
    for point in result["history"]:
        assert 0.0 <= point["accuracy_at_answer"] <= 1.0 and 0.0 <= point["accuracy_at_object_word"] <= 1.0
    assert result["inputs"] == inputs and result["eval_questions"] == 6


def test_learnability_geometry_options_reach_the_model(
    tiny_benchmark: Path, tmp_path: Path, benchmark_script
) -> None:
    diag = benchmark_script("zoo_learnability")
    out = tmp_path / "result.json"
    assert diag.main(["--model", "zoo-llava", "--inputs", "symbolic", "--steps", "1", "--patch-size", "16",
                      "--layers", "2", "--eval-size", "6", "--benchmark", str(tiny_benchmark), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["patch_size"], result["layers"]) == (16, 2)
