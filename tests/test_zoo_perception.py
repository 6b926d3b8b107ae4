"""The zoo perception diagnostic (benchmarks/zoo_perception.py): its targets follow the boxes on all three
families, and it runs end to end and reports a held-out AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vrp_utils.data.benchmark import CATEGORIES
from vrp_utils.data.pope import load_benchmark
from vrp_utils.models import zoo


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_targets_follow_the_boxes(
    name: str, tiny_benchmark: Path, benchmark_script
) -> None:
    diag = benchmark_script("zoo_perception")
    model, processor, adapter = zoo.build_untrained(zoo.ZOO[name])
    dataset = load_benchmark("random", tiny_benchmark)
    images = diag.distinct_images(dataset, processor, adapter)
    assert len(images.images) == len(set(dataset["image_file"]))
    first = dataset[0]
    expected = {box["category"] for box in first["boxes"]}
    assert {CATEGORIES[i] for i in images.presence[0].nonzero().flatten().tolist()} == expected
    # tokens are covered by exactly the image's categories: each box covers >= 1/4 of itself in some patch
    for index in range(len(images.images)):
        covering = {CATEGORIES[i] for i in images.coverage[index].any(dim=0).nonzero().flatten().tolist()}
        present = {CATEGORIES[i] for i in images.presence[index].nonzero().flatten().tolist()}
        assert covering == present
        assert images.labels[index].shape == images.coverage[index].shape[:1]
        # a token with a category label is covered by that category; background tokens by none
        labelled = images.labels[index] < len(CATEGORIES)
        assert images.coverage[index][labelled, images.labels[index][labelled]].eq(1).all()
        assert images.coverage[index][~labelled].eq(0).all()
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, len(CATEGORIES))
    logits = zoo.image_token_logits(model, processor, head, images.images[:2])
    assert logits.shape == (2, *images.coverage[0].shape)


@pytest.mark.parametrize("loss", ["presence", "dense", "softmax"])
def test_diagnostic_runs_and_reports_auroc(
    loss: str, tiny_benchmark: Path, tmp_path: Path, benchmark_script
) -> None:
    diag = benchmark_script("zoo_perception")
    out = tmp_path / "result.json"
    assert diag.main(["--model", "zoo-qwen2-vl", "--loss", loss, "--steps", "2", "--every", "1", "--batch-size", "4",
                      "--vision-layers", "1", *(["--whiten"] if loss == "softmax" else []), "--benchmark", str(tiny_benchmark), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [p["step"] for p in result["history"]] == [1, 2]
    assert all(0.0 <= p["presence_auroc"] <= 1.0 for p in result["history"])
    assert result["loss"] == loss and result["vision_layers"] == 1
