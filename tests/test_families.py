"""Tokenizers, processors and configs of the three families (real classes, built locally)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vrp_utils.models.adapters import adapter_for
from vrp_utils.models.families import (
    SPECIAL_TOKENS,
    SUPPORTED_MODEL_TYPES,
    build_family,
    build_processor,
    build_tokenizer,
    special_token_ids,
    zoo_config,
)

WORDS = ["is", "there", "a", "cup", "dog", "in", "the", "image", "yes", "no", "not"]
FAMILIES = list(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tokenizer_word_level_and_decodes_readably(model_type: str) -> None:
    tok = build_tokenizer(model_type, ["Cup", "dog", "is", "there", "a", "yes", "no", "not"])
    ids = tok("Is there a Cup?", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["is", "there", "a", "cup", "?"]
    assert tok.decode(tok("No, there is not.", add_special_tokens=False)["input_ids"]) == "no, there is not."
    assert tok.decode(tok("Yes.", add_special_tokens=False)["input_ids"]) == "yes."
    # fixed special-token layout, which the configs rely on
    for role, token in SPECIAL_TOKENS[model_type]:
        assert tok.convert_tokens_to_ids(token) == special_token_ids(model_type)[role]
    assert tok.padding_side == "left"
    # special tokens are matched before lowercasing and skipped on decode
    ids = tok(f"{tok.image_token} yes", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.image_token_id and tok.decode(ids, skip_special_tokens=True) == "yes"
    # words outside the vocabulary become <unk> (build_inputs refuses those, see test_adapters)
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_tokenizer_rejects_bad_words() -> None:
    with pytest.raises(ValueError, match="not a single word"):
        build_tokenizer("llava", ["cup."])
    with pytest.raises(ValueError, match="not a single word"):
        build_tokenizer("llava", ["two words"])
    with pytest.raises(ValueError, match="not a single word"):
        build_tokenizer("llava", ["<image>"])  # special tokens are not words
    with pytest.raises(TypeError, match="words\\[1\\] is int"):
        build_tokenizer("llava", ["cup", 3])
    with pytest.raises(ValueError, match="supported: llava, paligemma, qwen2_vl"):
        build_tokenizer("gpt2", WORDS)


def test_tokenizer_is_deterministic_in_word_order() -> None:
    a = build_tokenizer("llava", WORDS)
    b = build_tokenizer("llava", list(reversed(WORDS)))
    assert a.get_vocab() == b.get_vocab()


def test_prompt_formats() -> None:
    llava = build_processor("llava", WORDS)
    pali = build_processor("paligemma", WORDS)
    qwen = build_processor("qwen2_vl", WORDS)
    configs = {mt: zoo_config(mt, len(p.tokenizer)) for mt, p in [("llava", llava), ("paligemma", pali), ("qwen2_vl", qwen)]}
    q = "Is there a cup in the image?"
    assert adapter_for(configs["llava"]).prompt(llava, q) == "USER: <image>\nIs there a cup in the image? ASSISTANT:"
    assert adapter_for(configs["paligemma"]).prompt(pali, q) == "<image>Is there a cup in the image?"
    assert adapter_for(configs["qwen2_vl"]).prompt(qwen, q) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a cup in the image?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    image = Image.new("RGB", (64, 64))
    # LLaVA: BOS, then <image> expanded to 64 (8x8 patches, CLS dropped) in place.
    ids = llava(images=[image], text=["USER: <image>\nIs there a cup? ASSISTANT:"])["input_ids"][0]
    toks = llava.tokenizer.convert_ids_to_tokens(ids)
    assert toks == ["<s>", "user", ":"] + ["<image>"] * 64 + ["is", "there", "a", "cup", "?", "assistant", ":"]
    # PaliGemma: 64 image tokens first, then BOS, the prefix (the "\n" separator is whitespace here).
    ids = pali(images=[image], text=["<image>Is there a cup?"])["input_ids"][0]
    toks = pali.tokenizer.convert_ids_to_tokens(ids)
    assert toks == ["<image>"] * 64 + ["<bos>", "is", "there", "a", "cup", "?"]
    # Qwen2-VL: 64 px -> 8x8 patches -> 2x2 merge -> 16 <|image_pad|>.
    text = adapter_for(configs["qwen2_vl"]).prompt(qwen, "Is there a cup?")
    out = qwen(images=[image], text=[text])
    toks = qwen.tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert toks.count("<|image_pad|>") == 16
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert toks[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_processor_save_load_round_trip(model_type: str, tmp_path) -> None:
    config, processor = build_family(model_type, WORDS)
    adapter = adapter_for(config)
    processor.save_pretrained(tmp_path)
    loaded = adapter.load_processor(str(tmp_path))
    assert type(loaded) is type(processor)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.chat_template == processor.chat_template
    adapter.check_processor(loaded)

    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 64), "blue")]
    questions = ["Is there a cup?", "Is there a dog in the image?"]
    a = adapter.build_inputs(processor, images, questions, ["Yes.", "No, there is not."])
    b = adapter.build_inputs(loaded, images, questions, ["Yes.", "No, there is not."])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


@pytest.mark.parametrize("model_type", FAMILIES)
def test_zoo_config_matches_processor(model_type: str) -> None:
    config, processor = build_family(model_type, WORDS)
    adapter = adapter_for(config)
    adapter.check_processor(processor)
    assert config.image_token_id == processor.image_token_id
    assert config.get_text_config().vocab_size == len(processor.tokenizer)
    assert config.get_text_config().eos_token_id == processor.tokenizer.eos_token_id
    assert config.get_text_config().pad_token_id == processor.tokenizer.pad_token_id
    model = adapter.model_class(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.7e6 < n_params < 1.0e6, n_params
    assert model.config._attn_implementation == "sdpa"
    if model_type == "paligemma":
        # PaliGemmaProcessor adds 1,024 <loc> + 128 <seg> tokens; the vocabulary is sized after it.
        assert len(processor.tokenizer) == len(build_tokenizer(model_type, WORDS)) + 1152


@pytest.mark.parametrize("model_type", FAMILIES)
def test_initializer_range_sets_the_language_models_initial_weights(model_type: str) -> None:
    """The zoo starts its small language models wider than the library's 0.02 (see zoo_config)."""
    stds = {}
    for initializer_range in (0.02, 0.08):
        config, _ = build_family(model_type, WORDS, initializer_range=initializer_range)
        torch.manual_seed(0)
        model = adapter_for(config).model_class(config)
        language = [p for n, p in model.named_parameters() if n.startswith("model.language_model") and p.dim() == 2]
        vision = [p for n, p in model.named_parameters() if "visual" in n or "vision_tower" in n]
        stds[initializer_range] = (torch.cat([p.flatten() for p in language]).std().item(),
                                   [p.detach().clone() for p in vision])
    assert stds[0.02][0] == pytest.approx(0.02, rel=0.05) and stds[0.08][0] == pytest.approx(0.08, rel=0.05)
    assert all(torch.equal(a, b) for a, b in zip(stds[0.02][1], stds[0.08][1])), "the vision tower's start is untouched"


def test_mismatched_processor_is_refused() -> None:
    config, _ = build_family("llava", WORDS)
    other = build_processor("llava", WORDS, image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="crop 32"):
        adapter_for(config).check_processor(other)
    qwen_config, _ = build_family("qwen2_vl", WORDS)
    with pytest.raises(ValueError, match="patch/merge/temporal"):
        adapter_for(qwen_config).check_processor(build_processor("qwen2_vl", WORDS, image_size=64, patch_size=16))
    with pytest.raises(TypeError, match="Qwen2VLImageTextProcessor"):
        adapter_for(qwen_config).check_processor(build_processor("llava", WORDS))


def test_bad_geometry_errors() -> None:
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_processor("llava", WORDS, image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="patch_size\\*merge_size"):
        build_processor("qwen2_vl", WORDS, image_size=40, patch_size=8)
    with pytest.raises(ValueError, match="geometry must be"):
        build_processor("llava", WORDS, geometry="huge")
    with pytest.raises(ValueError, match="multiple of 16"):
        zoo_config("qwen2_vl", 100, hidden=96, heads=4)  # head_dim 24: no M-RoPE split


def test_patch_boxes_tile_the_image() -> None:
    configs = {mt: build_family(mt, WORDS)[0] for mt in FAMILIES}
    llava = adapter_for(configs["llava"]).patch_boxes((96, 64), (8, 8))
    # shortest-edge resize + center crop: the tokens tile the centered 64x64 square
    assert llava.shape == (64, 4)
    np.testing.assert_allclose(llava[0], [16, 0, 24, 8])
    np.testing.assert_allclose(llava[9], [24, 8, 32, 16])  # row 1, col 1
    np.testing.assert_allclose(llava[63], [72, 56, 80, 64])
    pali = adapter_for(configs["paligemma"]).patch_boxes((96, 64), (8, 8))
    np.testing.assert_allclose(pali[0], [0, 0, 12, 8])
    np.testing.assert_allclose(pali[63], [84, 56, 96, 64])
    qwen = adapter_for(configs["qwen2_vl"]).patch_boxes((96, 64), (3, 4))
    assert qwen.shape == (12, 4)
    np.testing.assert_allclose(qwen[4], [0, 64 / 3, 24, 128 / 3])  # row 1, col 0
    np.testing.assert_allclose(qwen[11], [72, 128 / 3, 96, 64])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rotary_base_is_the_zoos_or_the_checkpoints(model_type: str) -> None:
    from vrp_utils.models.families import CHECKPOINT_ROPE_THETA

    zoo_text = build_family(model_type, WORDS)[0].get_text_config()
    paper_text = build_family(model_type, WORDS, geometry="paper")[0].get_text_config()
    assert zoo_text.rope_parameters["rope_theta"] == 10_000.0
    assert paper_text.rope_parameters["rope_theta"] == CHECKPOINT_ROPE_THETA[model_type]
    assert CHECKPOINT_ROPE_THETA["qwen2_vl"] == 1_000_000.0  # Qwen2-VL-7B-Instruct's config.json
