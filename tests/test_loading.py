"""load_model: local directories, zoo names, cached hub ids, paper geometry and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GPT2Config

from vrp_utils import paths
from vrp_utils.models.adapters import LlavaAdapter, PaliGemmaAdapter, Qwen2VLAdapter, adapter_for
from vrp_utils.models.families import SUPPORTED_MODEL_TYPES, build_family, build_processor
from vrp_utils.models.loading import LoadedModel, load_model, zoo_names

WORDS = ["is", "there", "a", "cup", "dog", "in", "the", "image", "yes", "no", "not"]
FAMILIES = list(SUPPORTED_MODEL_TYPES)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny(model_type: str, directory, *, geometry: str = "zoo", seed: int = 0, **config_kwargs):
    config, processor = build_family(model_type, WORDS, geometry=geometry, **config_kwargs)
    torch.manual_seed(seed)
    model = adapter_for(config).model_class(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model


# (image size, expected grid) per family at the real checkpoints' geometry
PAPER_CASES = {
    "llava": ((400, 336), (24, 24)),  # 336 px crop / patch 14, CLS dropped -> 576
    "paligemma": ((300, 200), (16, 16)),  # squashed to 224 / patch 14 -> 256
    "qwen2_vl": ((336, 252), (9, 12)),  # 252x336 px = 18x24 patches of 14 -> 2x2 merge -> 9x12 = 108
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_paper_geometry_round_trip(model_type: str, tmp_path) -> None:
    save_tiny(model_type, tmp_path, geometry="paper", layers=1)  # one layer: the geometry is the point here
    loaded = load_model(tmp_path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == tmp_path.name and len(loaded.fingerprint) == 16
    assert type(loaded.adapter) is {"llava": LlavaAdapter, "paligemma": PaliGemmaAdapter, "qwen2_vl": Qwen2VLAdapter}[model_type]
    assert not loaded.model.training and loaded.model.config._attn_implementation == "sdpa"

    size, grid = PAPER_CASES[model_type]
    image = Image.new("RGB", size, "gray")
    inputs = loaded.adapter.build_inputs(loaded.processor, [image], ["Is there a dog in the image?"])
    assert loaded.adapter.patch_grid(inputs, 0) == grid
    if model_type == "qwen2_vl":
        assert inputs["image_grid_thw"].tolist() == [[1, 2 * grid[0], 2 * grid[1]]]
    positions = loaded.adapter.image_token_positions(inputs["input_ids"][0])
    assert len(positions) == grid[0] * grid[1] == {"llava": 576, "paligemma": 256, "qwen2_vl": 108}[model_type]
    boxes = loaded.adapter.patch_boxes(size, grid)
    assert boxes.shape == (grid[0] * grid[1], 4)
    with torch.no_grad():
        logits = loaded.model(**loaded.adapter.model_inputs(inputs)).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_paper_geometry_has_the_checkpoints_depth(model_type: str) -> None:
    from vrp_utils.models.families import PAPER_LAYERS

    assert PAPER_LAYERS == {"llava": 32, "paligemma": 18, "qwen2_vl": 28}  # the three checkpoints' config.json
    text = build_family(model_type, WORDS, geometry="paper")[0].get_text_config()
    assert text.num_hidden_layers == PAPER_LAYERS[model_type] and text.hidden_size == 32
    assert build_family(model_type, WORDS, geometry="paper", layers=3)[0].get_text_config().num_hidden_layers == 3


def test_paper_geometry_llava_extracts_every_layer(tiny_benchmark, tmp_path) -> None:
    """The CLI's 32-layer LLaVA-1.5 geometry through the extraction engine: 32 layers of 576-token rows stored."""
    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.extract.engine import ExtractionSettings
    from vrp_utils.extract.features import open_or_extract
    from vrp_utils.paper_geometry import main

    assert main(["llava", str(tmp_path / "paper-llava")]) == 0
    dataset = load_benchmark("random", tiny_benchmark).select(range(2))
    store = open_or_extract(str(tmp_path / "paper-llava"), dataset, ExtractionSettings(max_new_tokens=2),
                            root=tmp_path / "features", progress=False)
    assert store.n_ok == 2
    assert store.attention().shape[:2] == (2, 32) and store.attention().shape[-1] == 576
    assert store.image_token_mask().sum(axis=1).tolist() == [576, 576]
    for kind in ("last_prompt", "answer_mean"):
        assert store.hidden(kind=kind).shape == (2, 32, 32)
        assert np.isfinite(store.hidden(31, kind)).all()
    first_step = store.attention(31)[:, :, 0]  # [examples, heads, image tokens] at the first answer token
    assert np.isfinite(first_step).all() and (first_step.sum(axis=-1) > 0).all()


def test_zoo_name_and_fingerprint(tmp_path, monkeypatch) -> None:
    zoo = tmp_path / "zoo"
    save_tiny("llava", zoo / "tiny-llava", layers=1)
    save_tiny("llava", zoo / "tiny-llava-b", layers=1, seed=1)
    assert zoo_names(zoo) == ["tiny-llava", "tiny-llava-b"]

    a = load_model("tiny-llava", zoo_dir=zoo)
    assert a.name == "tiny-llava" and a.path == zoo / "tiny-llava"
    monkeypatch.setattr(paths, "ZOO_DIR", zoo)  # the default zoo is vrp_utils.paths.ZOO_DIR, the release
    with pytest.raises(ValueError, match="MANIFEST.json is missing"):  # which must have its manifest
        load_model("tiny-llava")
    from vrp_utils.models.release import MANIFEST_NAME, sha256_file

    files = {p.relative_to(zoo).as_posix(): sha256_file(p) for p in sorted(zoo.rglob("*")) if p.is_file()}
    (zoo / MANIFEST_NAME).write_text(json.dumps({"models": {"tiny-llava": {}, "tiny-llava-b": {}}, "files": files}))
    again = load_model("tiny-llava")
    assert again.fingerprint == a.fingerprint
    other = load_model("tiny-llava-b")
    assert other.fingerprint != a.fingerprint  # same config, different weights
    for p, q in zip(a.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)
    half = load_model("tiny-llava", dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_unknown_zoo_name_lists_available(tmp_path) -> None:
    zoo = tmp_path / "zoo"
    save_tiny("qwen2_vl", zoo / "tiny-qwen", layers=1)
    with pytest.raises(ValueError, match="Unknown zoo model 'nope' .*available: tiny-qwen"):
        load_model("nope", zoo_dir=zoo)
    with pytest.raises(ValueError, match="the released zoo is committed under zoo/"):
        load_model("nope", zoo_dir=tmp_path / "empty")


def test_unsupported_model_type(tmp_path) -> None:
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: llava, paligemma, qwen2_vl"):
        load_model(tmp_path)


def test_missing_hub_weights(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not available locally.*Provide them by"):
        load_model("llava-hf/llava-1.5-7b-hf", cache_dir=tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="No model directory"):
        load_model(tmp_path / "does" / "not" / "exist")


def test_hub_id_from_local_cache(tmp_path) -> None:
    """A hub id resolves to its snapshot in the local HF cache (laid out as huggingface_hub does)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--vrp--tiny-paligemma"
    save_tiny("paligemma", repo / "snapshots" / commit, layers=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_model("vrp/tiny-paligemma", cache_dir=tmp_path / "hf")
    assert loaded.name == "vrp/tiny-paligemma"
    assert loaded.path == repo / "snapshots" / commit
    assert loaded.adapter.model_type == "paligemma"


def test_mismatched_or_missing_processor(tmp_path) -> None:
    save_tiny("llava", tmp_path / "bad", layers=1)
    build_processor("llava", WORDS, image_size=32).save_pretrained(tmp_path / "bad")  # overwrite: 32 px crop
    with pytest.raises(ValueError, match="crop 32"):
        load_model(tmp_path / "bad")

    config, _ = build_family("llava", WORDS, layers=1)
    adapter_for(config).model_class(config).save_pretrained(tmp_path / "no-processor")
    with pytest.raises(FileNotFoundError, match="cannot load the LlavaProcessor"):
        load_model(tmp_path / "no-processor")

    (tmp_path / "no-weights").mkdir()
    config.save_pretrained(tmp_path / "no-weights")
    with pytest.raises(FileNotFoundError, match="No weight files"):
        load_model(tmp_path / "no-weights")
