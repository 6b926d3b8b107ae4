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

    return zoo.TrainingImages.from_dataset(load_benchmark("random", tiny_benchmark))


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


def test_code_fingerprint_ignores_comments_and_docstrings_but_not_code(tmp_path):
    module = tmp_path / "training.py"
    module.write_text('"""Train."""\n\ndef steps():\n    """How many."""\n    return 600  # enough\n')
    before = zoo.code_fingerprint(tmp_path)
    module.write_text('"""Train the zoo."""\n\n\ndef steps():\n    """How many steps."""\n    # measured\n    return 600\n')
    assert zoo.code_fingerprint(tmp_path) == before
    module.write_text('"""Train the zoo."""\n\ndef steps():\n    return 601\n')
    changed = zoo.code_fingerprint(tmp_path)
    assert changed != before
    (tmp_path / "other.py").write_text("x = 1\n")
    assert zoo.code_fingerprint(tmp_path) != changed


def test_unknown_zoo_model_is_refused(tiny_benchmark):
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build_zoo(["zoo-gpt"], benchmark_dir=tiny_benchmark)


def test_parallel_build_gives_the_same_weights_as_a_serial_one(tiny_benchmark, tmp_path, monkeypatch):
    """Worker processes get the spec itself (a patched ZOO would not reach a spawned worker)."""
    for name in ("zoo-llava", "zoo-qwen2-vl"):
        monkeypatch.setitem(zoo.ZOO, name, dataclasses.replace(zoo.ZOO[name], steps=2, vision_steps=2, batch_size=2,
                                                               vision_batch_size=2, warmup_steps=1, layers=2))
    serial = zoo.build_zoo(["zoo-llava", "zoo-qwen2-vl"], out_dir=tmp_path / "serial", benchmark_dir=tiny_benchmark, progress=False)
    parallel = zoo.build_zoo(["zoo-llava", "zoo-qwen2-vl"], out_dir=tmp_path / "parallel", benchmark_dir=tiny_benchmark,
                             progress=False, jobs=2)
    assert list(parallel) == ["zoo-llava", "zoo-qwen2-vl"]
    for name in parallel:
        assert parallel[name]["metrics"] == serial[name]["metrics"]
        weights = [(tmp_path / run / name / "model.safetensors").read_bytes() for run in ("serial", "parallel")]
        assert weights[0] == weights[1], name


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
def test_released_zoo_accuracy_is_imperfect_and_beats_every_baseline():
    """The release's cards against the band, computed here from the numbers themselves (not through
    ``release.band_problems``, which ``tests/test_release.py`` checks on constructed cards)."""
    from vrp_utils.paths import RESULTS_DIR

    cards = json.loads((ZOO_DIR / "zoo.json").read_text())["models"]
    rows = json.loads((RESULTS_DIR / "baselines.json").read_text())["rows"]
    best = {s: max(r["accuracy"] for r in rows if r["setting"] == s) for s in zoo.SETTINGS}
    accuracies = []
    for name, card in cards.items():
        random_accuracy = card["metrics"]["random"]["accuracy"]
        assert 0.70 <= random_accuracy <= 0.92, (name, random_accuracy)
        assert card["metrics"]["adversarial"]["accuracy"] <= min(random_accuracy, card["metrics"]["popular"]["accuracy"]), name
        for setting in zoo.SETTINGS:
            assert card["metrics"][setting]["accuracy"] > best[setting], (name, setting)
        accuracies.append(tuple(card["metrics"][s]["accuracy"] for s in zoo.SETTINGS))
    # Three distinct models, not one copied: their accuracies differ in some setting. (One setting alone can tie
    # by chance: zoo v2's LLaVA and Qwen2-VL both answer 915 of 1,080 random questions right.)
    assert len(set(accuracies)) == len(accuracies), "the three families should differ"


@pytest.mark.built
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_released_cards_are_what_the_released_weights_answer(name):
    """The card's accuracies equal those of the greedy answers this machine's `make features` extracted from the
    committed weights: the same weights give the same answers on every kernel path, so this holds on any CPU (a
    card that did not come from these weights, or a kernel path that flips answers, fails it)."""
    from vrp_utils.extract.features import open_features

    features = open_features(name, "all", extract_missing=False, progress=False)
    card = json.loads((ZOO_DIR / name / "model_card.json").read_text())
    measured = features.table.groupby("setting")["correct"].mean()
    for setting in zoo.SETTINGS:
        assert measured[setting] == pytest.approx(card["metrics"][setting]["accuracy"], abs=1e-12), (name, setting)
    assert features.error_counts()["distinct"] == 0


def test_readme_names_the_machine_of_each_model_in_a_mixed_release(tmp_path):
    import json

    from vrp_utils.readme import zoo_block

    cards = json.loads((ZOO_DIR / "zoo.json").read_text())["models"]
    first = next(iter(cards))
    for name, card in cards.items():
        card["provenance"] = {**card["provenance"], "cpu": "CPU A" if name == first else "CPU B", "cpu_capability": "AVX2"}
    (tmp_path / "zoo.json").write_text(json.dumps({"models": cards}))
    rest = " and ".join(n for n in cards if n != first)
    assert f"`make zoo`: {first} on CPU A (AVX2 kernels); {rest} on CPU B (AVX2 kernels), one" in zoo_block(tmp_path / "zoo.json")
    for card in cards.values():
        card["provenance"]["cpu"] = "CPU A"
    (tmp_path / "zoo.json").write_text(json.dumps({"models": cards}))
    assert "`make zoo` on CPU A (AVX2 kernels), one" in zoo_block(tmp_path / "zoo.json")


@pytest.mark.built
def test_readme_tables_match_the_build():
    import re

    from vrp_utils.readme import README, render

    def without_wall_times(text: str) -> str:  # measured on the building machine, not part of the result
        return re.sub(r"\| \d+\.\d min \|", "| (time) |", text)

    committed = README.read_text()
    assert without_wall_times(render(committed)) == without_wall_times(committed), "run `make readme` and commit README.md"


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


# ------------------------------------------------------------------------------- stage 1 pieces
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_patch_labels_give_each_token_the_category_covering_most_of_it(name):
    from PIL import Image

    from vrp_utils.data.benchmark import CATEGORIES

    _, processor, adapter = zoo.build_untrained(zoo.ZOO[name])
    inputs = adapter.build_inputs(processor, [Image.new("RGB", (64, 64), "white")], ["Is there a cup in the image?"])
    rows, cols = adapter.patch_grid(inputs, 0)
    cell = 64 // cols
    # a cup over the first cell and a tree over half of it (and all of the second cell); a tiny
    # apple inside the last cell (it covers all of itself: labelled although its patch is mostly empty)
    boxes = [{"category": "cup", "bbox": [0, 0, cell, cell]},
             {"category": "tree", "bbox": [cell // 2, 0, 2 * cell, cell]},
             {"category": "apple", "bbox": [64 - cell // 2, 64 - cell // 2, 64 - 1, 64 - 1]}]
    labels = zoo.patch_labels(adapter, inputs, 0, (64, 64), boxes)
    assert labels.shape == (rows * cols,) and labels.dtype == torch.long
    assert labels[0] == CATEGORIES.index("cup") and labels[1] == CATEGORIES.index("tree")
    assert labels[-1] == CATEGORIES.index("apple")
    background = torch.ones(rows * cols, dtype=torch.bool)
    background[[0, 1, rows * cols - 1]] = False
    assert (labels[background] == len(CATEGORIES)).all()
    torch.testing.assert_close(zoo.patch_categories(adapter, inputs, 0, (64, 64), boxes)[0, CATEGORIES.index("tree")],
                               torch.tensor(1.0))  # half the first cell: still "covered" for the multi-hot view


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_whitened_patch_embedding_gives_decorrelated_unit_features(name, tiny_examples):
    """After the start, the patch embedding's outputs over the same patches have covariance gain^2 * I."""
    model, processor, _ = zoo.build_untrained(zoo.ZOO[name])
    pixels = processor.image_processor(tiny_examples.images, return_tensors="pt")["pixel_values"]
    zoo.whiten_patch_embedding(model, pixels, gain=0.5)
    conv = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    outputs = []
    hook = conv.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model.get_image_features(**processor.image_processor(tiny_examples.images, return_tensors="pt"))
    hook.remove()
    features = outputs[0].transpose(0, 1).reshape(conv.out_channels, -1)  # [channels, patches]
    covariance = torch.cov(features)
    torch.testing.assert_close(covariance, 0.25 * torch.eye(conv.out_channels), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_stage_one_skips_resizing_only_when_it_changes_nothing(name, tiny_examples):
    """Images at the zoo's input size skip resizing (unresized pixels equal resized ones); the benchmark's
    64 px images, other or mixed sizes resize (zoo v2 reads 96 px)."""
    import numpy as np

    spec = zoo.ZOO[name]
    _, processor, _ = zoo.build_untrained(spec)
    native = [np.asarray(image.resize((spec.image_size, spec.image_size))) for image in tiny_examples.images]
    assert zoo.resize_is_identity(processor, native)
    resized = processor.image_processor(native, return_tensors="pt")
    kept = processor.image_processor(native, return_tensors="pt", do_resize=False)
    assert all(torch.equal(resized[k], kept[k]) for k in resized)
    benchmark = [np.asarray(image) for image in tiny_examples.images]
    assert benchmark[0].shape[0] != spec.image_size
    assert not zoo.resize_is_identity(processor, benchmark)
    smaller = [np.asarray(image.resize((48, 48))) for image in tiny_examples.images[:2]]
    assert not zoo.resize_is_identity(processor, smaller)
    assert not zoo.resize_is_identity(processor, native[:1] + smaller[:1])


# ------------------------------------------------------------------------------- stage 2 pieces
def test_conversations_ask_each_category_once_and_answer_by_the_boxes():
    import numpy as np

    from vrp_utils.data.benchmark import CATEGORIES, question_text
    from vrp_utils.data.pope import parse_object

    generator = np.random.default_rng(0)
    present = ["cup", "fork", "plate"]
    counts = {"Yes.": 0, "No.": 0}
    lengths = []
    for _ in range(300):
        conversation = zoo.sample_conversation(generator, present, 6, ("Yes.", "No."))
        asked = [parse_object(q) for q, _ in conversation]
        assert len(set(asked)) == len(asked) and set(asked) <= set(CATEGORIES)
        for (question, answer), category in zip(conversation, asked):
            assert question == question_text(category)
            assert answer == ("Yes." if category in present else "No.")
            counts[answer] += 1
        lengths.append(len(conversation))
    # each turn is its own coin: yes and no about equally often, and a conversation ends early
    # only when a yes turn finds no unasked present category (at most 3 here)
    assert 0.4 < counts["Yes."] / sum(counts.values()) < 0.6
    assert min(lengths) >= 1 and max(lengths) == 6 and min(lengths) < 6
    assert zoo.sample_conversation(np.random.default_rng(1), [], 6, ("Yes.", "No."))[0][1] == "No."


def _two_conversations(name: str):
    """A one-layer untrained model of the family and its inputs for two conversations (two turns, then one)."""
    from PIL import Image
    from vrp_utils.data.benchmark import question_text

    spec = dataclasses.replace(zoo.ZOO[name], layers=1)
    model, processor, adapter = zoo.build_untrained(spec)
    yes, no = spec.answer_forms
    conversations = [[(question_text("cup"), yes), (question_text("tree"), no)], [(question_text("apple"), no)]]
    images = [Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "red")]
    return spec, model, processor, adapter, conversations, images, adapter.build_conversations(processor, images, conversations)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_object_word_hint_labels_each_turn_and_cached_features_give_the_same_loss(name):
    """The hint adds one label per turn (the answer's first token at the object word); a forward
    with cached image features (``mm_encoder_outputs``) equals the forward from pixels, and so does
    the loss from logits at the labelled columns only (:func:`zoo.answer_loss`)."""
    from vrp_utils.data.pope import parse_object
    from vrp_utils.models.adapters import IGNORE_INDEX

    spec, model, processor, adapter, conversations, images, inputs = _two_conversations(name)
    model.eval()
    tokenizer = processor.tokenizer
    plain = inputs["labels"].clone()
    zoo.add_object_word_hint(inputs, tokenizer, [[q for q, _ in c] for c in conversations])
    for row, turns in enumerate(conversations):
        added = ((inputs["labels"][row] != IGNORE_INDEX) & (plain[row] == IGNORE_INDEX)).nonzero().flatten().tolist()
        assert len(added) == len(turns)
        for position, (question, answer) in zip(added, turns):
            word = tokenizer(parse_object(question), add_special_tokens=False)["input_ids"][-1]
            assert int(inputs["input_ids"][row, position - 1]) == word
            assert int(inputs["labels"][row, position]) == tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        from_pixels = model(**inputs).loss
        cached = zoo.CachedImageFeatures(model, processor, images)
        without_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
        from_cache = model(**without_pixels, mm_encoder_outputs=cached.encoder_outputs([0, 1])).loss
        at_labels_only = zoo.answer_loss(model, without_pixels, mm_encoder_outputs=cached.encoder_outputs([0, 1]))
    torch.testing.assert_close(from_cache, from_pixels)
    torch.testing.assert_close(at_labels_only, from_pixels)
    unlabelled = dict(without_pixels, labels=torch.full_like(inputs["labels"], IGNORE_INDEX))
    with pytest.raises(ValueError, match="no labelled token"):
        zoo.answer_loss(model, unlabelled)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_hint_to_answer_labels_every_position_from_the_object_word_to_the_answer(name):
    """With ``span``, each turn's positions from the object word up to (not including) its answer all predict the
    answer's first token; nothing else changes, and the answer tokens keep their own labels."""
    from vrp_utils.data.pope import parse_object
    from vrp_utils.models.adapters import IGNORE_INDEX

    spec, _, processor, _, conversations, _, inputs = _two_conversations(name)
    assert spec.hint_to_answer  # the released recipe
    tokenizer = processor.tokenizer
    plain = inputs["labels"].clone()
    zoo.add_object_word_hint(inputs, tokenizer, [[q for q, _ in c] for c in conversations], span=True)
    for row, turns in enumerate(conversations):
        ids = inputs["input_ids"][row].tolist()
        expected = plain[row].clone()
        cursor = 0
        for question, answer in turns:
            word = tokenizer(parse_object(question), add_special_tokens=False)["input_ids"][-1]
            position = ids.index(word, cursor)
            start = next(i for i in range(position + 1, len(ids)) if plain[row, i] != IGNORE_INDEX)
            first = tokenizer(answer, add_special_tokens=False)["input_ids"][0]
            assert int(plain[row, start]) == first
            expected[position + 1 : start] = first
            cursor = start
        assert torch.equal(inputs["labels"][row], expected), row


def test_answer_stage_leaves_the_vision_tower_unchanged(tiny_examples):
    spec = dataclasses.replace(zoo.ZOO["zoo-qwen2-vl"], steps=2, vision_steps=2, batch_size=2, vision_batch_size=2, warmup_steps=1)
    model, processor, adapter = zoo.build_untrained(spec)
    zoo.pretrain_vision(model, processor, adapter, spec, tiny_examples, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zoo.train_answers(model, processor, adapter, spec, tiny_examples, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.language_model", "lm_head")) for n in changed), sorted(changed)[:5]
    assert all(p.requires_grad for p in model.parameters())


def test_evaluation_answers_each_shared_question_once_and_scores_it_per_split(tiny_benchmark, monkeypatch):
    from vrp_utils.data.pope import load_benchmark, parse_answer, pope_metrics

    spec = dataclasses.replace(zoo.ZOO["zoo-llava"], layers=1)
    model, processor, adapter = zoo.build_untrained(spec)
    model.eval()
    splits = {s: load_benchmark(s, tiny_benchmark) for s in zoo.SETTINGS}
    calls = []
    real_answer = zoo.answer

    def counting_answer(*args, **kwargs):
        calls.append(len(args[4]))
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(zoo, "answer", counting_answer)
    metrics = zoo.evaluate(model, processor, adapter, splits, batch_size=7, progress=False)
    distinct = {(f, q) for split in splits.values() for f, q in zip(split["image_file"], split["question"])}
    assert sum(calls) == len(distinct) < sum(len(s) for s in splits.values())
    for name, split in splits.items():  # the same numbers as answering the split on its own
        texts = real_answer(model, processor, adapter, [im.convert("RGB") for im in split["image"]], split["question"])
        assert metrics[name] == pope_metrics(list(split["label"]), [parse_answer(t) for t in texts])


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_branch_init_scale_shrinks_only_the_residual_branch_outputs(name):
    """zoo_depth_recipe.py's --branch-scale: o_proj and down_proj start at 1/sqrt(2L) of the plain init, nothing else moves."""
    spec = dataclasses.replace(zoo.ZOO[name], layers=3, vision_steps=0, steps=0)
    plain, _, _ = zoo.build_untrained(spec)
    scaled, _, _ = zoo.build_untrained(dataclasses.replace(spec, branch_init_scale=True))
    plain, scaled = dict(plain.named_parameters()), dict(scaled.named_parameters())
    branch = [n for n in plain if n.startswith("model.language_model.layers.") and n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(branch) == 6
    for n, p in plain.items():
        expected = p / 6 ** 0.5 if n in branch else p
        torch.testing.assert_close(scaled[n], expected, rtol=0, atol=1e-7, msg=n)
