"""The model zoo: deterministic training, cards, loading by name and path, answers through real processors."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from vrp_utils.models import zoo
from vrp_utils.paths import ZOO_DIR

ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "paligemma": "PaliGemmaForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration"}
PROCESSORS = {"llava": "LlavaProcessor", "paligemma": "PaliGemmaProcessor", "qwen2_vl": "Qwen2VLProcessor"}


def _weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny_examples(tiny_benchmark):
    from vrp_utils.data.pope import load_benchmark

    return zoo.TrainingExamples.from_dataset(load_benchmark("random", tiny_benchmark), seed=0)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_training_is_deterministic_and_changes_weights(name, tiny_examples):
    spec = dataclasses.replace(zoo.ZOO[name], steps=3, vision_steps=2, batch_size=4, vision_batch_size=2, warmup_steps=1)
    torch.set_num_threads(1)
    untrained = _weights_digest(zoo.build_untrained(spec)[0])
    first = zoo.train(spec, tiny_examples, progress=False)
    second = zoo.train(spec, tiny_examples, progress=False)
    assert _weights_digest(first[0]) == _weights_digest(second[0]), "same seed must give the same weights"
    assert _weights_digest(first[0]) != untrained
    assert type(first[0]).__name__ == ARCHITECTURES[spec.model_type]
    assert first[3]["steps"] == 3 and len(first[3]["loss_curve"]) >= 1


def test_fingerprint_follows_the_spec(tiny_benchmark):
    spec = zoo.ZOO["zoo-llava"]
    assert zoo.spec_fingerprint(spec, tiny_benchmark) == zoo.spec_fingerprint(spec, tiny_benchmark)
    assert zoo.spec_fingerprint(dataclasses.replace(spec, seed=99), tiny_benchmark) != zoo.spec_fingerprint(spec, tiny_benchmark)


def test_unknown_zoo_model_is_refused(tiny_benchmark):
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build_zoo(["zoo-gpt"], benchmark_dir=tiny_benchmark)


def test_build_zoo_writes_cards_and_skips_when_up_to_date(tiny_benchmark, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(zoo.ZOO, "zoo-llava", dataclasses.replace(zoo.ZOO["zoo-llava"], steps=2, vision_steps=1, batch_size=4, vision_batch_size=4, warmup_steps=1))
    cards = zoo.build_zoo(["zoo-llava"], out_dir=tmp_path, benchmark_dir=tiny_benchmark, progress=False)
    card = json.loads((tmp_path / "zoo-llava" / "model_card.json").read_text())
    assert card == cards["zoo-llava"]
    assert set(card["metrics"]) == set(zoo.SETTINGS) and card["architecture"] == ARCHITECTURES["llava"]
    assert (tmp_path / "zoo.json").is_file() and (tmp_path / "zoo-llava" / "README.md").is_file()
    stamp = (tmp_path / "zoo-llava" / "model_card.json").stat().st_mtime_ns
    capsys.readouterr()
    zoo.build_zoo(["zoo-llava"], out_dir=tmp_path, benchmark_dir=tiny_benchmark, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "zoo-llava" / "model_card.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------ the built zoo
@pytest.mark.built
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_built_zoo_model_loads_by_name_and_path_and_answers(name):
    from vrp_utils.data.pope import load_benchmark, parse_answer
    from vrp_utils.models.loading import load_model

    by_name = load_model(name)
    by_path = load_model(str(ZOO_DIR / name))
    assert by_name.fingerprint == by_path.fingerprint
    assert type(by_name.model).__name__ == ARCHITECTURES[by_name.model.config.model_type]
    assert PROCESSORS[by_name.model.config.model_type] in [c.__name__ for c in type(by_name.processor).__mro__]
    rows = load_benchmark("random")[:8]
    texts = zoo.answer(by_name.model, by_name.processor, by_name.adapter, rows["image"], rows["question"])
    assert all(parse_answer(t, rule="strict", on_fail="none") in {"yes", "no"} for t in texts), texts


@pytest.mark.built
@pytest.mark.xfail(strict=True, reason="open (issue 3): within ~4 CPU minutes the zoo stays near chance; see the issue note")
def test_built_zoo_accuracy_is_imperfect_and_beats_every_baseline():
    from vrp_utils.paths import RESULTS_DIR

    cards = json.loads((ZOO_DIR / "zoo.json").read_text())["models"]
    rows = json.loads((RESULTS_DIR / "baselines.json").read_text())["rows"]
    best = {s: max(r["accuracy"] for r in rows if r["setting"] == s) for s in zoo.SETTINGS}
    accuracies = []
    for name, card in cards.items():
        random_accuracy = card["metrics"]["random"]["accuracy"]
        assert 0.70 <= random_accuracy <= 0.92, (name, random_accuracy)
        assert card["metrics"]["adversarial"]["accuracy"] < random_accuracy, name
        for setting in zoo.SETTINGS:
            assert card["metrics"][setting]["accuracy"] > best[setting], (name, setting)
        accuracies.append(random_accuracy)
    assert len(set(accuracies)) == len(accuracies), "the three families should differ"


@pytest.mark.built
def test_readme_tables_match_the_build():
    from vrp_utils.readme import README, render

    assert render(README.read_text()) == README.read_text(), "run `make readme` and commit README.md"


@pytest.mark.built
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_built_zoo_model_extracts_through_the_engine(name, tmp_path):
    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.extract.engine import ExtractionSettings, extract
    from vrp_utils.models.loading import load_model

    loaded = load_model(name)
    store = extract(loaded, load_benchmark("adversarial").select(range(3)), ExtractionSettings(max_new_tokens=4, batch_size=3),
                    root=tmp_path, progress=False)
    table = store.table()
    assert store.summary()["n_ok"] == 3 and len(table) == 3
    assert store.attention().shape[:3] == (3, loaded.model.config.get_text_config().num_hidden_layers,
                                           loaded.model.config.get_text_config().num_attention_heads)
    assert (table["n_image_tokens"] == table["grid_rows"] * table["grid_cols"]).all()
