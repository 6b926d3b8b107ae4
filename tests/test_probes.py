"""Hidden-state probes: grouped CV, the leakage test both ways, controls, logit lens, the ablation hook."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vrp_utils.analysis import probes as P
from vrp_utils.extract.engine import ExtractionSettings, run_batch
from vrp_utils.extract.features import open_features

ZOO = ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")


def synthetic(n_images: int = 40, per_image: int = 6, width: int = 8, seed: int = 0):
    """Rows with image groups, one informative feature and noise."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"img{i:03d}" for i in range(n_images)], per_image)
    y = rng.random(len(groups)) < 0.6
    X = rng.normal(size=(len(groups), width))
    X[:, 0] += 1.5 * y
    return X, y, groups


# ------------------------------------------------------------------ grouped CV


def test_no_image_in_two_folds_outer_or_inner():
    X, y, groups = synthetic()
    plan = P.fold_plan(y, groups, folds=5, inner_folds=P.INNER_FOLDS, seed=3)
    assert set(plan.outer.tolist()) == set(range(5))
    for image in set(groups):
        assert len(set(plan.outer[groups == image].tolist())) == 1
    for f, inner in enumerate(plan.inner):
        assert (inner[plan.outer == f] == -1).all()  # the outer test fold never enters the inner CV
        train = plan.outer != f
        assert set(inner[train].tolist()) == set(range(P.INNER_FOLDS))
        for image in set(groups[train]):
            assert len(set(inner[groups == image].tolist())) == 1


@pytest.mark.parametrize("kind", P.PROBES)
def test_cross_validated_scores_every_row_out_of_fold(kind):
    X, y, groups = synthetic(n_images=100)
    run = P.cross_validated(X, y, groups, kind, folds=5, seed=1)
    assert run.scores.shape == y.shape and np.isfinite(run.scores).all()
    assert all(c in P.grid(kind) for c in run.chosen) and len(run.chosen) == 5
    assert P.auroc(run.scores, y, groups).value > 0.7  # the informative feature is found
    again = P.cross_validated(X, y, groups, kind, folds=5, seed=1)
    assert np.array_equal(run.scores, again.scores)  # same seed, same scores


def test_probes_are_standardised_pipelines():
    for kind in P.PROBES:
        pipe = P.make_probe(kind, P.grid(kind)[0])
        assert type(pipe.steps[0][1]).__name__ == "StandardScaler"
    with pytest.raises(ValueError, match="l1, mlp"):
        P.make_probe("svm", 1.0)


def test_inner_cv_chooses_without_the_test_fold():
    """The strength is chosen on training rows only: changing test-fold features leaves the choice alone."""
    X, y, groups = synthetic(seed=4)
    run = P.cross_validated(X, y, groups, "l1", folds=5, seed=2)
    X2 = X.copy()
    X2[run.plan.outer == 0] = np.random.default_rng(9).normal(size=X2[run.plan.outer == 0].shape)
    run2 = P.cross_validated(X2, y, groups, "l1", folds=5, seed=2)
    assert run2.chosen[0] == run.chosen[0]


# ------------------------------------------------------------------ leakage


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_leakage_sits_at_chance_when_grouped_and_leaks_by_row(seed):
    """Shuffled labels: 0.5 inside the CI with image-grouped folds; clearly above 0.5 by row with duplicates.

    Width 64 as a probe layer has (tiny data, so the MLP can memorise). Cross-validation on random
    labels has a known negative bias (the training folds hold the complement of the test fold's
    labels): on seed 0 of this synthetic set the grouped AUROC is 0.39 [0.33, 0.45]; seeds 1-3 are shown.
    """
    rng = np.random.default_rng(seed)
    n_distinct, width = 300, 64
    X = rng.normal(size=(n_distinct, width))
    images = np.array([f"img{i // 4:03d}" for i in range(n_distinct)])  # 4 questions per image
    copies = rng.integers(1, 4, size=n_distinct)  # each input asked in 1-3 settings
    rows = np.repeat(np.arange(n_distinct), copies)
    result = {r["split"]: r for r in P.leakage_test(X, rows, images[rows], kind="mlp", folds=5, seed=seed, n_boot=300)}
    grouped, by_row = result["grouped by image"], result["by row, duplicates kept"]
    assert grouped["ci_low"] <= 0.5 <= grouped["ci_high"]
    assert by_row["ci_low"] > 0.6 and by_row["value"] > grouped["value"] + 0.15
    assert grouped["n_duplicate_rows"] == len(rows) - n_distinct


# ------------------------------------------------------------------ controls on a real (tiny) store


@pytest.fixture(scope="module")
def llava_features(tiny_model_dir, tiny_benchmark, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-stores")
    return open_features(str(tiny_model_dir("zoo-llava")), "all", root=root, benchmark_dir=tiny_benchmark, progress=False)


def test_controls_and_answer_subsets(llava_features):
    distinct = llava_features.distinct.copy()
    designs = P.control_features(distinct)
    assert designs["answer"].shape == (len(distinct), 1)
    assert designs["object"].shape[1] == distinct["object"].nunique()
    assert (designs["answer_x_object"].sum(axis=1) == 1).all()
    logprob = P.mean_answer_logprob(distinct)
    first = distinct.iloc[0]
    assert logprob[0] == pytest.approx(np.mean(first["token_logprob"][: max(int(first["answer_length"]), 1)]))
    # subsets: within "yes" and "no" answers only those rows count
    y = np.array([1, 0, 1, 0, 1, 1, 0, 0], bool)
    answers = np.array(["yes"] * 4 + ["no"] * 4, object)
    score = np.array([0.9, 0.1, 0.8, 0.2, 0.1, 0.9, 0.8, 0.2])
    rows = {r["subset"]: r for r in P.subset_aurocs(score, y, [f"i{i}" for i in range(8)], answers, n_boot=50)}
    assert rows["answer_yes"]["value"] == 1.0 and rows["answer_yes"]["n"] == 4
    assert rows["answer_no"]["value"] == 0.5 and rows["answer_no"]["n"] == 4


def test_probe_table_refuses_too_few_images_with_a_reason(llava_features):
    table = P.probe_table(llava_features, ["l1"], ["last_prompt"], folds=5, seeds=1)
    assert table["value"].isna().all() and table["undefined"].str.contains("images|correct|wrong").all()


def test_every_probe_at_the_primary_position_the_sweep_probe_elsewhere(llava_features):
    """The MLP is fitted at the primary position only; the other position and the untrained twin get the first probe."""
    assert P.probe_kinds("probe", "last_prompt", ["l1", "mlp"], ["last_prompt", "answer_mean"]) == ["l1", "mlp"]
    assert P.probe_kinds("probe", "answer_mean", ["l1", "mlp"], ["last_prompt", "answer_mean"]) == ["l1"]
    assert P.probe_kinds("untrained", "last_prompt", ["mlp", "l1"], ["last_prompt"]) == ["mlp"]
    assert P.probe_kinds("control", "object", ["mlp"], ["answer_mean"]) == ["l1"]
    table = P.probe_table(llava_features, ["l1", "mlp"], ["answer_mean", "last_prompt"], folds=5, seeds=1)  # refused: rows declared
    assert set(zip(table["probe"], table["position"])) == {("l1", "answer_mean"), ("mlp", "answer_mean"), ("l1", "last_prompt")}


def test_untrained_twin_is_deterministic_and_different(tiny_model_dir, tmp_path):
    from vrp_utils.extract.untrained import untrained_twin
    from vrp_utils.models.loading import fingerprint_files

    model = tiny_model_dir("zoo-qwen2-vl")
    a = untrained_twin(str(model), seed=3, root=tmp_path / "a")
    b = untrained_twin(str(model), seed=3, root=tmp_path / "b")
    c = untrained_twin(str(model), seed=4, root=tmp_path / "c")
    assert fingerprint_files(a) == fingerprint_files(b) != fingerprint_files(c)
    assert fingerprint_files(a) != fingerprint_files(model)
    import json

    def without_dtype(value):  # save_pretrained records the weights' dtype; everything else is the model's own config
        if isinstance(value, dict):
            return {k: without_dtype(v) for k, v in value.items() if k != "dtype"}
        return value

    own, twin = (json.loads((d / "config.json").read_text()) for d in (model, a))
    assert without_dtype(twin) == without_dtype(own)


def test_probe_table_with_untrained_twin_on_a_small_store(llava_features):
    """All sources appear; fitted on the distinct inputs with 2 folds (the tiny benchmark has 4 images)."""
    twin = P.untrained_store(llava_features, seed=0, progress=False)
    table = P.probe_table(llava_features, ["l1"], ["last_prompt"], folds=2, seeds=1, untrained=twin, n_boot=50)
    if table["undefined"].notna().all():  # random weights may answer everything the same way
        pytest.skip(f"tiny store cannot be cross-validated: {table['undefined'].iloc[0]}")
    assert set(table["source"]) == {"probe", "untrained", "control"}
    assert set(table[table["source"] == "control"]["probe"]) == set(P.CONTROLS)
    assert (table["n"] <= len(llava_features.distinct)).all()


# ------------------------------------------------------------------ logit lens


@pytest.mark.parametrize("name", ZOO)
def test_logit_lens_at_the_last_layer_is_the_models_own_output(name, tiny_model_dir, tiny_loaded, tiny_benchmark, tmp_path):
    features = open_features(str(tiny_model_dir(name)), "random", root=tmp_path, benchmark_dir=tiny_benchmark, progress=False)
    loaded = tiny_loaded(name)
    lens = P.LogitLens(str(features.model_dir), loaded)
    distinct = features.distinct
    states = np.asarray(features.store.hidden(None, "last_prompt"))[distinct["array_index"].to_numpy()]
    last = states.shape[1] - 1
    # the engine's yes_no_margin is log P(yes) - log P(no) from the model's own logits at that position
    np.testing.assert_allclose(lens.margin(states[:, last]), distinct["yes_no_margin"].to_numpy(float), atol=1e-4)
    # and the full logit vector equals a plain forward's logits at the last prompt position
    row = features.inputs[int(distinct["distinct_id"].iloc[0]) - 1]
    inputs = loaded.adapter.build_inputs(loaded.processor, [row["image"].convert("RGB")], [row["question"]])
    with torch.no_grad():
        own = loaded.model(**loaded.adapter.model_inputs(inputs)).logits[0, -1].float()
    np.testing.assert_allclose(lens.logits(states[:1, last])[0].numpy(), own.numpy(), atol=1e-4, rtol=1e-4)
    margins, table = P.logit_lens(features, loaded, n_boot=50)
    assert set(margins["layer"]) == set(range(states.shape[1]))
    assert set(table["statistic"]) >= {"auroc_answer_margin", "auroc_truth_margin"}


# ------------------------------------------------------------------ neuron ablation hook


@pytest.mark.parametrize("name", ZOO)
def test_hook_zeroes_exactly_those_dims_at_that_layer_and_leaves_the_model_unchanged(name, tiny_loaded, tiny_benchmark):
    from vrp_utils.data.pope import load_benchmark

    loaded = tiny_loaded(name)
    split = load_benchmark("random", tiny_benchmark).select(range(3))
    images, questions = [r["image"].convert("RGB") for r in split], [r["question"] for r in split]
    settings = ExtractionSettings(attention=False, max_new_tokens=2)
    before_params = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    layers = loaded.model.get_decoder().layers
    hooks_before = [len(layer._forward_hooks) for layer in layers]
    intact = run_batch(loaded, images, questions, settings)
    width = intact.arrays[0]["hidden_last_prompt"].shape[-1]
    dims = [0, 3, width - 1]
    others = np.setdiff1d(np.arange(width), dims)
    for layer in (0, len(layers) - 1):
        with P.zeroed_dimensions(loaded.model, layer, dims):
            ablated = run_batch(loaded, images, questions, settings)
        for a, b in zip(intact.arrays, ablated.arrays):
            h_a, h_b = a["hidden_last_prompt"], b["hidden_last_prompt"]
            assert (h_b[layer, dims] == 0).all() and (h_a[layer, dims] != 0).all()
            np.testing.assert_allclose(h_b[layer, others], h_a[layer, others], atol=1e-5)  # only those dims
            np.testing.assert_array_equal(h_b[:layer], h_a[:layer])  # layers before are untouched
            if layer < len(layers) - 1:
                assert not np.allclose(h_b[layer + 1:], h_a[layer + 1:])  # the change propagates
    # after the context: no hook left, same weights, same outputs
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before
    after = run_batch(loaded, images, questions, settings)
    for a, b in zip(intact.arrays, after.arrays):
        np.testing.assert_array_equal(a["hidden_last_prompt"], b["hidden_last_prompt"])
    assert all(torch.equal(before_params[k], v) for k, v in loaded.model.state_dict().items())


def test_hook_is_removed_on_error(tiny_loaded):
    model = tiny_loaded("zoo-llava").model
    layer = model.get_decoder().layers[0]
    count = len(layer._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with P.zeroed_dimensions(model, 0, [1]):
            assert len(layer._forward_hooks) == count + 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == count


def test_ablation_pass_through_the_engine_matches_a_direct_hooked_pass(llava_features, tiny_loaded):
    """The store of an ablation intervention holds the answers of the hooked model; its identity names layer and dims."""
    from vrp_utils.extract.features import open_or_extract

    dims = [1, 2, 5]
    intervention = P.ablation_intervention(0, dims, "top", 3, None, 0)
    assert intervention.identity["dims"] == dims and intervention.identity["layer"] == 0
    settings = ExtractionSettings(attention=False, hidden=False)
    store = open_or_extract(str(llava_features.model_dir), llava_features.inputs, settings, root=llava_features.store.path.parent,
                            progress=False, intervention=intervention)
    other = open_or_extract(str(llava_features.model_dir), llava_features.inputs, settings, root=llava_features.store.path.parent,
                            progress=False, intervention=P.ablation_intervention(0, [1, 2], "top", 2, None, 0))
    assert store.path != other.path
    loaded = tiny_loaded("zoo-llava")
    table = store.table().set_index("question_id")
    rows = [llava_features.inputs[i] for i in range(4)]
    with P.zeroed_dimensions(loaded.model, 0, dims):
        direct = run_batch(loaded, [r["image"].convert("RGB") for r in rows], [r["question"] for r in rows], settings)
    assert [table.loc[r["question_id"], "answer"] for r in rows] == [rec["answer"] for rec in direct.records]


def test_ablation_sweep_pools_every_models_passes_and_does_not_depend_on_jobs(tiny_model_dir, tiny_benchmark, tmp_path):
    """Two families' passes in one pool (2 workers) give the same table as one process, each model at its own layer."""
    import shutil

    features = {name: open_features(str(tiny_model_dir(name)), "random", limit=8, root=tmp_path, benchmark_dir=tiny_benchmark,
                                    progress=False) for name in ("zoo-llava", "zoo-qwen2-vl")}
    base = {p.name for p in tmp_path.iterdir()}
    layers = {"zoo-llava": 0, "zoo-qwen2-vl": 1}
    tables = []
    for jobs in (2, 1):
        for stale in set(p.name for p in tmp_path.iterdir()) - base:  # every pass extracted afresh by this run
            shutil.rmtree(tmp_path / stale)
        table, versus, info = P.ablation_sweep(features, layers, "2", 1, n_boot=50, progress=False, jobs=jobs)
        assert set(info) == set(features)
        for name, f in features.items():
            rows = table[(table["model"] == f.model) & (table["scope"] == "balanced")]
            assert len(rows) == info[name]["passes"] == 2  # top-2, random-2 (the plan's "half" is tested below)
            assert set(rows["layer"]) == {layers[name]} and set(rows["condition"]) == {"top", "random"}
            assert set(table[table["model"] == f.model]["scope"]) == {"balanced", "distinct", "random"}
            pair = versus[versus["model"] == f.model]
            assert len(pair) == 1 and pair["condition"].iloc[0] == "top" and pair["versus"].iloc[0] == "random"
            # Paired difference = balanced change of top minus balanced change of random (same inputs, same "before").
            change = rows.set_index("condition")["value"]
            assert pair["value"].iloc[0] == pytest.approx(change["top"] - change["random"], abs=1e-12)
        assert len({p.name for p in tmp_path.iterdir()} - base) >= 4  # four ablated passes
        tables.append((table, versus))
    pd.testing.assert_frame_equal(tables[0][0], tables[1][0])
    pd.testing.assert_frame_equal(tables[0][1], tables[1][1])


def test_ablation_plan_top_random_half():
    weights = np.array([0.0, 0.5, 0.1, 0.9, 0.0, 0.3, 0.0, 0.0])
    plans = P.ablation_plan(weights, [2], draws=2, seed=0, half=True)
    top = [p for p in plans if p["condition"] == "top"]
    assert top[0]["dims"] == [1, 3]
    random = [p for p in plans if p["condition"] == "random"]
    assert len(random) == 2 and all(len(p["dims"]) == 2 for p in random)
    half = [p for p in plans if p["condition"] == "half"]
    assert len(half) == 2 and all(len(set(p["dims"])) == 4 for p in half)
    assert plans == P.ablation_plan(weights, [2], draws=2, seed=0, half=True)


# ------------------------------------------------------------------ transfer halves


def test_image_halves_are_disjoint_and_balanced():
    images = [f"img{i}" for i in range(11)] * 3
    halves = P.image_halves(images, seed=5)
    assert set(halves) == set(images) and set(halves.values()) == {0, 1}
    assert abs(sum(halves.values()) - (11 - sum(halves.values()))) <= 1
    assert halves == P.image_halves(list(reversed(images)), seed=5)


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize("bad, match", [
    (dict(probes=["svm"]), "choose from l1, mlp"),
    (dict(positions=["first"]), "choose from last_prompt, answer_mean"),
    (dict(folds=1), "folds must be an integer >= 2"),
    (dict(seeds=0), "seeds must be an integer >= 1"),
    (dict(layer=2, n_layers=2), r"0\.\.1"),
    (dict(layer=-1, n_layers=2), r"0\.\.1"),
    (dict(ablation_k="200", width=128), r"1\.\.128"),
    (dict(ablation_k="5,eleven", width=128), "half"),
    (dict(draws=0), "ablation_draws"),
])
def test_bad_parameters_fail_naming_the_choices(bad, match):
    args = dict(probes=["l1"], positions=["last_prompt"], folds=5, seeds=2)
    args.update({k: bad.pop(k) for k in list(bad) if k in args})
    with pytest.raises(ValueError, match=match):
        P.check_parameters(args["probes"], args["positions"], args["folds"], args["seeds"], **bad)


def test_parse_ablation():
    assert P.parse_ablation("1,5,10%,25%,half", 128) == ([1, 5, 13, 32], True)
    assert P.parse_ablation("5", 128) == ([5], False)


def test_notebook_refuses_a_bad_parameter_before_any_work(tmp_path):
    """The runner executes the parameter check first: an unknown probe fails naming the choices, no store is written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "VRP_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "vrp_utils.run", "03_probes", "-p", "probes", "l1,svm"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "choose from l1, mlp" in done.stdout + done.stderr
    assert not (tmp_path / "features").exists() and not (tmp_path / "untrained").exists()


def test_free_rival_is_the_answer_its_margin_and_their_product(llava_features):
    distinct = llava_features.distinct
    rival = P.rival_features(distinct)
    yes = (distinct["parsed"] == "yes").to_numpy(float)
    margin = np.abs(distinct["yes_no_margin"].to_numpy(float))
    np.testing.assert_array_equal(rival, np.column_stack([yes, margin, yes * margin]))
    np.testing.assert_array_equal(P.control_features(distinct)["free_rival"], rival)


def test_control_comparisons_are_paired_on_the_probes_folds():
    """On constructed data with 40 images: the rival's folds equal the probe's, and each row's difference equals
    the two out-of-fold AUROCs computed apart (stats.auroc_difference's value), averaged over CV seeds."""
    from types import SimpleNamespace

    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 240
    correct = rng.random(n) < 0.7
    parsed = np.where(rng.random(n) < 0.4, "yes", "no")
    distinct = pd.DataFrame({"distinct_id": np.arange(n), "array_index": np.arange(n), "correct": correct,
                             "image_file": [f"img{i // 6}.png" for i in range(n)], "parsed": parsed,
                             "object": rng.choice(["cat", "dog", "cup"], n),
                             "yes_no_margin": np.where(correct, 2.0, 0.5) * rng.normal(1.0, 0.5, n),
                             "token_logprob": [[-0.1 * rng.random()] for _ in range(n)], "answer_length": 1})
    hidden = np.column_stack([correct + rng.normal(0, 1.5, n), rng.normal(size=(n, 5))])
    store = SimpleNamespace(hidden=lambda layer, position: hidden[:, None, :].repeat(2, axis=1)[:, layer])
    features = SimpleNamespace(distinct=distinct, store=store, model="constructed")
    table = P.control_comparisons(features, 1, folds=4, seeds=2, n_boot=50).set_index("control")
    assert set(table.index) == {"answer", "object", "answer_x_object", "free_rival", "abs_margin", "mean_logprob"}
    y, groups = correct, distinct["image_file"].to_numpy()
    expected = []
    for s in (0, 1):
        probe = P.cross_validated(hidden, y, groups, "l1", folds=4, seed=s)
        rival = P.cross_validated(P.rival_features(distinct), y, groups, "l1", folds=4, seed=s)
        np.testing.assert_array_equal(probe.plan.outer, rival.plan.outer)
        expected.append(roc_auc_score(y, probe.scores) - roc_auc_score(y, rival.scores))
    assert table.loc["free_rival", "value"] == pytest.approx(np.mean(expected), abs=1e-12)
    margin = np.abs(distinct["yes_no_margin"].to_numpy())
    assert table.loc["abs_margin", "value"] == pytest.approx(
        np.mean([roc_auc_score(y, P.cross_validated(hidden, y, groups, "l1", folds=4, seed=s).scores) for s in (0, 1)])
        - roc_auc_score(y, margin), abs=1e-12)
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()


def _layered_features(n: int = 240, layers: int = 4):
    """Constructed features whose hidden state carries correctness more strongly with depth (a signal of SD 1 at
    the last layer, none at the first), 40 images of 6 inputs."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    correct = rng.random(n) < 0.7
    distinct = pd.DataFrame({"distinct_id": np.arange(n), "array_index": np.arange(n), "correct": correct,
                             "image_file": [f"img{i // 6}.png" for i in range(n)]})
    strength = np.linspace(0.0, 1.0, layers)
    hidden = np.stack([np.column_stack([k * correct + rng.normal(0, 1.0, n), rng.normal(size=(n, 4))]) for k in strength], axis=1)
    store = SimpleNamespace(hidden=lambda layer, position: hidden if layer is None else hidden[:, layer])
    return SimpleNamespace(distinct=distinct, store=store, model="constructed"), hidden, correct


def test_layer_differences_are_paired_against_the_best_layer():
    from sklearn.metrics import roc_auc_score

    features, hidden, y = _layered_features()
    table = P.layer_differences(features, 3, folds=4, seeds=2, n_boot=50).set_index("layer")
    assert list(table.index) == [0, 1, 2, 3] and table.loc[3, "value"] == 0.0 and pd.isna(table.loc[3, "ci_low"])
    groups = features.distinct["image_file"].to_numpy()
    for layer in (0, 2):
        expected = np.mean([roc_auc_score(y, P.cross_validated(hidden[:, layer], y, groups, "l1", folds=4, seed=s).scores)
                            - roc_auc_score(y, P.cross_validated(hidden[:, 3], y, groups, "l1", folds=4, seed=s).scores)
                            for s in (0, 1)])
        assert table.loc[layer, "value"] == pytest.approx(expected, abs=1e-12)
    assert table.loc[0, "ci_high"] < 0  # no signal at the first layer: shown worse than the best


def test_reliability_layer_is_the_first_layer_not_shown_worse_than_the_best():
    rows = pd.DataFrame({"layer": [0, 1, 2, 3, 4], "best_layer": 4, "value": [-0.2, -0.05, -0.01, 0.004, 0.0],
                         "ci_low": [-0.25, -0.08, -0.03, -0.01, None], "ci_high": [-0.15, -0.02, 0.01, 0.02, None]})
    found = P.reliability_layer(rows, n_layers=8)
    assert (found["layer"], found["relative_depth"], found["best_layer"]) == (2, 3 / 8, 4)
    assert found["ci_high"] == 0.01 and found["rule"] == P.RELIABILITY_RULE
    only_best = P.reliability_layer(rows.assign(ci_high=[-0.1, -0.1, -0.1, -0.1, None]), n_layers=5)
    assert only_best["layer"] == 4 and only_best["relative_depth"] == 1.0
    with pytest.raises(ValueError, match="no layer differences"):
        P.reliability_layer(pd.DataFrame(), n_layers=2)


# ------------------------------------------------------------------ across layers (issue 24)


def _signal_from(n_layers: int, first: int, n_images: int = 40, per_image: int = 6, seed: int = 3, drift: float = 0.0):
    """Constructed features: correctness is carried (one direction, shift 2 SD) only from layer ``first`` on, where
    the state stays as it arrived (the layers after ``first`` repeat it, plus noise of SD ``drift``); the layers before
    hold noise only."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    n = n_images * per_image
    correct = rng.random(n) < 0.6
    distinct = pd.DataFrame({"distinct_id": np.arange(n), "array_index": np.arange(n), "correct": correct,
                             "image_file": [f"img{i // per_image:03d}.png" for i in range(n)]})
    hidden = rng.normal(size=(n, n_layers, 5))
    hidden[:, first, 0] += 2.0 * correct
    hidden[:, first:] = hidden[:, first:first + 1] + drift * rng.normal(size=(n, n_layers - first, 5))
    store = SimpleNamespace(hidden=lambda layer, position: hidden if layer is None else hidden[:, layer])
    return SimpleNamespace(distinct=distinct, store=store, model="constructed"), hidden, correct


def test_cross_layer_scores_diagonal_is_cross_validated_and_one_fit_serves_every_test_layer():
    features, hidden, y = _signal_from(4, 2, drift=0.5)
    groups = features.distinct["image_file"].to_numpy()
    matrices = [hidden[:, layer] for layer in range(4)]
    scores = P.cross_layer_scores(matrices, y, groups, "l1", folds=4, seed=1)
    assert scores.shape == (4, 4, len(y)) and np.isfinite(scores).all()
    for layer in range(4):
        np.testing.assert_array_equal(scores[layer, layer], P.cross_validated(matrices[layer], y, groups, "l1", folds=4, seed=1).scores)
    # the probe fitted at layer 2 scores layer 3's held-out rows with its own weights (one fit per train layer and fold)
    plan = P.fold_plan(y, groups, 4, P.INNER_FOLDS, 1)
    test = plan.outer == 0
    strength = P.choose_strength("l1", matrices[2][~test], y[~test].astype(int), plan.inner[0][~test], 1)
    model = P._fit("l1", strength, 1, matrices[2][~test], y[~test].astype(int))
    np.testing.assert_array_equal(scores[2, 3, test], model.predict_proba(matrices[3][test])[:, 1])
    only = P.cross_layer_scores(matrices, y, groups, "l1", folds=4, seed=1, train=[2])
    np.testing.assert_array_equal(only[0], scores[2])


def test_layer_transfer_reads_where_a_signal_lives_and_its_diagonal_is_the_probe_table():
    from sklearn.metrics import roc_auc_score

    features, hidden, y = _signal_from(5, 2, drift=0.5)
    scores = P.layer_scores(features, folds=4, seeds=2, seed=0)
    assert scores.layers == [0, 1, 2, 3, 4] and scores.scores.shape == (2, 5, 5, len(y))
    again = P.layer_scores(features, folds=4, seeds=2, seed=0, jobs=2)
    np.testing.assert_array_equal(scores.scores, again.scores)  # jobs changes nothing
    table = P.layer_transfer(scores, n_boot=100)
    assert len(table) == 25 and set(table.columns) >= {"model", "train_layer", "test_layer", "value", "ci_low", "ci_high", "n",
                                                       "n_groups", "method"}
    cell = table.set_index(["train_layer", "test_layer"])
    groups = features.distinct["image_file"].to_numpy()
    for layer in range(5):  # diagonal: mean over CV seeds of each layer's own out-of-fold AUROC
        expected = np.mean([roc_auc_score(y, P.cross_validated(hidden[:, layer], y, groups, "l1", folds=4, seed=s).scores)
                            for s in (0, 1)])
        assert cell.loc[(layer, layer), "value"] == pytest.approx(expected, abs=1e-12)
    for train in (2, 3, 4):
        for test in (2, 3, 4):
            assert cell.loc[(train, test), "ci_low"] > 0.75  # the direction is shared by the layers that carry it
        for test in (0, 1):
            assert cell.loc[(train, test), "ci_low"] < 0.5 < cell.loc[(train, test), "ci_high"]  # no signal there
    summary = P.layer_transfer_summary(table).set_index("train_layer")
    assert list(summary.index) == [0, 1, 2, 3, 4]
    assert summary.loc[3, "above_chance"] == "2-4" and summary.loc[3, "lowest_layer"] in (0, 1)
    assert summary.loc[3, "value"] == cell.loc[(3, 3), "value"]


def test_layer_ranges():
    assert P._layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert P._layer_ranges([4]) == "4" and P._layer_ranges([]) == "none"


def _explicit_draws(n_boot: int, k: int, seed: int) -> np.ndarray:
    """The image indices the cluster bootstrap draws (scipy.stats.bootstrap with one batch), checked against it."""
    from vrp_utils.analysis.stats import cluster_bootstrap

    draws = np.random.default_rng(seed).integers(0, k, (n_boot, k))
    counted = cluster_bootstrap(lambda codes, weights: weights[..., 0], [np.arange(k)], np.arange(k), n_boot=n_boot, seed=seed)
    np.testing.assert_array_equal(counted.replicates, (draws == 0).sum(axis=1))
    return draws


def test_reliability_layer_ci_equals_a_brute_force_loop_over_the_same_resamples():
    """Three layers on 12 images: every replicate redone with explicit rows and sklearn's roc_auc_score."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    k, per, n_boot, seed = 12, 5, 200, 7
    groups = np.repeat([f"img{i:02d}" for i in range(k)], per)
    y = rng.random(k * per) < 0.55
    scores = np.stack([a * y + rng.normal(size=len(y)) for a in (0.0, 1.0, 2.0)])
    best = 2
    found = P.reliability_layer_ci(scores, y, groups, best, n_boot=n_boot, seed=seed)
    draws = _explicit_draws(n_boot, k, seed)
    images = np.unique(groups)
    d = np.full((3, n_boot), np.nan)
    for b, drawn in enumerate(draws):
        rows = np.concatenate([np.flatnonzero(groups == images[g]) for g in drawn])
        if y[rows].all() or not y[rows].any():
            continue
        d[:, b] = [roc_auc_score(y[rows], s[rows]) - roc_auc_score(y[rows], scores[best][rows]) for s in scores]
    se = np.array([np.std(row[np.isfinite(row)], ddof=1) for row in d])
    defined = np.isfinite(d).all(axis=0)
    layer = np.argmax(d[:, defined] + P.RELIABILITY_Z * se[:, None] >= 0, axis=0)
    low, high = np.quantile(layer, [0.025, 0.975], method="inverted_cdf")
    assert (found["layer_ci_low"], found["layer_ci_high"]) == (low, high)
    assert (found["relative_depth_ci_low"], found["relative_depth_ci_high"]) == ((low + 1) / 3, (high + 1) / 3)
    assert found["replicate_share"] == {l: pytest.approx(np.mean(layer == l), abs=1e-12) for l in range(3)}
    assert found["undefined_replicates"] == int((~defined).sum())
    assert min(found["replicate_share"].values()) > 0.1  # every layer is chosen by some replicates: the check has teeth


@pytest.mark.parametrize("first", [0, 3, 5])
def test_reliability_layer_and_its_ci_find_where_a_signal_appears(first):
    """A signal that appears at layer ``first`` of 6 and stays: measured against the last layer (as good as any from
    ``first`` on), the reliability layer is ``first`` and its CI that one layer."""
    features, hidden, y = _signal_from(6, first, n_images=60)
    scores = P.layer_scores(features, folds=4, seeds=2, seed=0)
    best = 5
    differences = P.layer_differences(features, best, folds=4, seeds=2, n_boot=200, scores=scores)
    found = P.reliability_layer(differences, 6, scores, n_boot=200, seed=0)
    assert found["layer"] == first and found["relative_depth"] == (first + 1) / 6
    assert (found["layer_ci_low"], found["layer_ci_high"]) == (first, first)
    assert found["relative_depth_ci_low"] == found["relative_depth_ci_high"] == (first + 1) / 6
    assert found["rule"] == P.RELIABILITY_RULE and "percentiles" in found["ci_method"]
    row, = P.reliability_depth_rows({"m": found})
    assert (row["model"], row["layer"], row["n_layers"]) == ("m", first, 6)
    assert row["value"] == row["ci_low"] == row["ci_high"] == (first + 1) / 6
    # the differences from precomputed scores equal those computed afresh
    pd.testing.assert_frame_equal(differences, P.layer_differences(features, best, folds=4, seeds=2, n_boot=200))


def test_reliability_layer_ci_refuses_a_bad_best_layer_or_one_class():
    X, y, groups = synthetic(n_images=10, width=3)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        P.reliability_layer_ci(X.T, y, groups, 3)
    with pytest.raises(ValueError, match="one class"):
        P.reliability_layer_ci(X.T, np.ones(len(y), bool), groups, 0)


def test_layer_roles_run_a_shared_layer_once():
    assert P.layer_roles({"reliability": 1, "best": 3}) == {1: "reliability", 3: "best"}
    assert P.layer_roles({"reliability": 2, "best": 2}) == {2: "reliability and best"}
    assert P.layer_roles(4) == {4: "chosen"}


def test_ablation_sweep_at_the_reliability_and_the_best_layer(tiny_model_dir, tiny_benchmark, tmp_path):
    """A real tiny model: two roles at two layers give two sets of passes, each row naming its role; one shared
    layer gives one set whose role names both."""
    name = "zoo-llava"
    features = {name: open_features(str(tiny_model_dir(name)), "random", limit=8, root=tmp_path, benchmark_dir=tiny_benchmark,
                                    progress=False)}
    table, versus, info = P.ablation_sweep(features, {name: {"reliability": 0, "best": 1}}, "2", 1, n_boot=50, progress=False)
    balanced = table[table["scope"] == "balanced"]
    assert set(zip(balanced["layer"], balanced["layer_role"])) == {(0, "reliability"), (1, "best")}
    assert len(balanced) == info[name]["passes"] == 4  # top-2 and random-2 at each layer
    assert set(info[name]["layers"]) == {"reliability", "best"} and info[name]["layers"]["best"]["layer"] == 1
    assert set(zip(versus["layer"], versus["layer_role"])) == {(0, "reliability"), (1, "best")}
    shared, versus, info = P.ablation_sweep(features, {name: {"reliability": 1, "best": 1}}, "2", 1, n_boot=50, progress=False)
    rows = shared[shared["scope"] == "balanced"]
    assert set(rows["layer_role"]) == {"reliability and best"} and len(rows) == info[name]["passes"] == 2
    # the shared layer's rows are the "best" rows of the two-layer sweep (the same stores, read again)
    pd.testing.assert_frame_equal(rows.drop(columns="layer_role").reset_index(drop=True),
                                  balanced[balanced["layer"] == 1].drop(columns="layer_role").reset_index(drop=True))
