"""Family adapters on real tiny models (random weights): image tokens, patch geometry, training inputs, generation."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import GPT2Config

from vrp_utils.models.adapters import IGNORE_INDEX, adapter_for
from vrp_utils.models.families import SUPPORTED_MODEL_TYPES, build_family

WORDS = ["is", "there", "a", "cup", "dog", "in", "the", "image", "yes", "no", "not"]
FAMILIES = list(SUPPORTED_MODEL_TYPES)
QUESTIONS = ["Is there a cup?", "Is there a dog in the image?"]
ANSWERS = ["Yes.", "No, there is not."]
# different sizes: Qwen2-VL gets 16 tokens (8x8 patches, 4x4 merged) and 12 (48x64 px -> 3x4 merged)
IMAGE_SIZES = [(64, 64), (96, 64)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def family(model_type: str):
    config, processor = build_family(model_type, WORDS)
    adapter = adapter_for(config)
    torch.manual_seed(0)
    model = adapter.model_class(config).eval()
    return model, processor, adapter


def images() -> list[Image.Image]:
    colours = ["red", "blue"]
    return [Image.new("RGB", size, c) for size, c in zip(IMAGE_SIZES, colours)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_image_token_positions_and_grid(model_type: str) -> None:
    _, processor, adapter = family(model_type)
    inputs = adapter.build_inputs(processor, images(), QUESTIONS)
    counts = []
    for i in range(2):
        ids = inputs["input_ids"][i]
        positions = adapter.image_token_positions(ids)
        expected = torch.nonzero(ids == processor.image_token_id).flatten()
        assert torch.equal(positions, expected)
        rows, cols = adapter.patch_grid(inputs, i)
        assert len(positions) == rows * cols
        # contiguous block: one image per example
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + rows * cols))
        counts.append(len(positions))
    if model_type == "qwen2_vl":
        assert counts == [16, 12]
        assert [adapter.patch_grid(inputs, i) for i in range(2)] == [(4, 4), (3, 4)]
    else:
        assert counts == [64, 64]
        assert adapter.patch_grid(inputs, 0) == (8, 8)
    # the different questions give different prompt lengths: the shorter one is left padded
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and (not mask[0].all() or not mask[1].all())
    # with the image tokens found from the ids, padding does not shift anything: same ids as alone
    alone = adapter.build_inputs(processor, images()[:1], QUESTIONS[:1])
    n = alone["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"][0, -n:], alone["input_ids"][0])


def _marked(size: tuple[int, int], box: np.ndarray | None) -> Image.Image:
    """Black image, white inside the central half of ``box`` (keeps resize blur inside the cell)."""
    image = Image.new("RGB", size, "black")
    if box is not None:
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        ImageDraw.Draw(image).rectangle([x0 + w / 4, y0 + h / 4, x1 - w / 4 - 1, y1 - h / 4 - 1], fill="white")
    return image


@pytest.mark.parametrize("model_type", FAMILIES)
def test_image_token_k_sees_patch_box_k(model_type: str) -> None:
    """Known answer: light up the pixels of patch_boxes[k] only; the k-th image token's
    input embedding (after the vision tower and projector are scattered into the sequence)
    is the one that changes. A non-square image checks the LLaVA crop / Qwen2-VL resize."""
    model, processor, adapter = family(model_type)
    size = (96, 64)
    question = ["Is there a cup?"]
    blank = adapter.build_inputs(processor, [_marked(size, None)], question)
    grid = adapter.patch_grid(blank, 0)
    boxes = adapter.patch_boxes(size, grid)
    positions = adapter.image_token_positions(blank["input_ids"][0])
    with torch.no_grad():
        base = model(**blank, output_hidden_states=True).hidden_states[0][0, positions]
    rows, cols = grid
    cells = [(0, 0), (0, cols - 1), (rows - 1, 1), (rows // 2, cols // 2)]
    for r, c in cells:
        k = r * cols + c
        inputs = adapter.build_inputs(processor, [_marked(size, boxes[k])], question)
        assert torch.equal(adapter.image_token_positions(inputs["input_ids"][0]), positions)
        with torch.no_grad():
            embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0, positions]
        change = (embeds - base).norm(dim=-1)
        top = change.topk(2)
        assert int(top.indices[0]) == k, (model_type, (r, c), change.view(rows, cols))
        assert top.values[0] > 5 * top.values[1]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_training_inputs_label_only_the_answer(model_type: str) -> None:
    model, processor, adapter = family(model_type)
    tok = processor.tokenizer
    inputs = adapter.build_inputs(processor, images(), QUESTIONS, ANSWERS)
    labels = inputs["labels"]
    assert labels.shape == inputs["input_ids"].shape
    for i, answer in enumerate(ANSWERS):
        labelled = torch.nonzero(labels[i] != IGNORE_INDEX).flatten()
        expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[i, labelled].tolist() == expected
        # the answer is the tail of the row (left padding) and starts at answer_start
        assert labelled.tolist() == list(range(labels.shape[1] - len(expected), labels.shape[1]))
        assert adapter.answer_start(inputs, i) == labels.shape[1] - len(expected)
        assert torch.equal(labels[i, labelled], inputs["input_ids"][i, labelled])
        # the prompt part equals the generation prompt
        prompt = adapter.build_inputs(processor, images()[i : i + 1], QUESTIONS[i : i + 1])["input_ids"][0]
        start = adapter.answer_start(inputs, i)
        assert torch.equal(inputs["input_ids"][i, start - len(prompt) : start], prompt)
    if model_type == "paligemma":  # the answer is the causal suffix of the prefix-LM
        assert torch.equal(inputs["token_type_ids"].bool(), labels != IGNORE_INDEX)
    # The loss is the mean negative log-likelihood of exactly the answer tokens (and end token), each
    # predicted from the position before it: recomputed from a forward without labels.
    with torch.no_grad():
        loss = model(**inputs).loss
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = [
        -log_probs[i, position - 1, labels[i, position]]
        for i in range(labels.shape[0])
        for position in torch.nonzero(labels[i] != IGNORE_INDEX).flatten().tolist()
    ]
    torch.testing.assert_close(loss.float(), torch.stack(nll).mean(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_conversations_label_every_answer_and_keep_turn_one_exact(model_type: str) -> None:
    """Multi-turn training inputs: every answer (and nothing else) labelled; turn one is the single-question input."""
    model, processor, adapter = family(model_type)
    tok = processor.tokenizer
    conversations = [list(zip(QUESTIONS, ANSWERS)), [(QUESTIONS[1], ANSWERS[1])]]
    inputs = adapter.build_conversations(processor, images(), conversations)
    labels = inputs["labels"]
    for row, turns in enumerate(conversations):
        labelled = labels[row][labels[row] != IGNORE_INDEX].tolist()
        expected = [t for _, a in turns for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        assert labelled == expected
        assert torch.equal(labels[row][labels[row] != IGNORE_INDEX], inputs["input_ids"][row][labels[row] != IGNORE_INDEX])
        # later questions are in the sequence, unlabelled
        for question, _ in turns[1:]:
            q_ids = tok(question, add_special_tokens=False)["input_ids"]
            ids = inputs["input_ids"][row].tolist()
            at = [i for i in range(len(ids) - len(q_ids) + 1) if ids[i : i + len(q_ids)] == q_ids]
            assert at and all(labels[row, at[-1] + k] == IGNORE_INDEX for k in range(len(q_ids)))
    # causal families (and PaliGemma's causal suffix): turn one sees nothing of later turns
    single = adapter.build_inputs(processor, images()[:1], QUESTIONS[:1], ANSWERS[:1])
    alone = adapter.build_conversations(processor, images()[:1], conversations[:1])
    n = single["input_ids"].shape[1]
    assert torch.equal(alone["input_ids"][0, :n], single["input_ids"][0])
    assert torch.equal(alone["labels"][0, :n], single["labels"][0])
    with torch.no_grad():
        torch.testing.assert_close(model(**alone).logits[0, :n], model(**single).logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 conversations"):
        adapter.build_conversations(processor, images(), conversations[:1])
    with pytest.raises(ValueError, match="at least one turn"):
        adapter.build_conversations(processor, images(), [conversations[0], []])
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        adapter.build_conversations(processor, images(), [conversations[0], [("Is there a zebra?", "No.")]])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_unknown_words_are_refused(model_type: str) -> None:
    _, processor, adapter = family(model_type)
    with pytest.raises(ValueError, match="example 1 .*outside the tokenizer's vocabulary"):
        adapter.build_inputs(processor, images(), ["Is there a cup?", "Is there a zebra?"])
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        adapter.build_inputs(processor, images(), ["Is there a cup?"])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generation_left_padding_batch_equals_single(model_type: str) -> None:
    model, processor, adapter = family(model_type)
    kwargs = adapter.generation_kwargs(processor, max_new_tokens=4)
    kwargs["eos_token_id"] = None  # random weights: keep all 4 steps comparable
    batch = adapter.build_inputs(processor, images(), QUESTIONS)
    seq_len = batch["input_ids"].shape[1]
    assert adapter.answer_start(batch, 0) == seq_len
    with torch.no_grad():
        out = model.generate(**adapter.model_inputs(batch), **kwargs)
        logits = model(**adapter.model_inputs(batch)).logits[:, -1]
    assert out.shape == (2, seq_len + 4)
    alone_texts = []
    for i in range(2):
        single = adapter.build_inputs(processor, images()[i : i + 1], QUESTIONS[i : i + 1])
        with torch.no_grad():
            alone = model.generate(**adapter.model_inputs(single), **kwargs)
            alone_logits = model(**adapter.model_inputs(single)).logits[:, -1]
        assert alone[0, -4:].tolist() == out[i, -4:].tolist()
        torch.testing.assert_close(alone_logits[0], logits[i], atol=1e-4, rtol=1e-4)
        alone_texts.append(processor.tokenizer.decode(alone[0, single["input_ids"].shape[1] :], skip_special_tokens=True))
    # The batch's answers read as the lone runs' answers: no padding or prompt leaks into the decoded text.
    assert processor.tokenizer.batch_decode(out[:, seq_len:], skip_special_tokens=True) == alone_texts


@pytest.mark.parametrize("model_type", FAMILIES)
def test_yes_no_token_ids(model_type: str) -> None:
    _, processor, adapter = family(model_type)
    yes, no = adapter.yes_no_token_ids(processor.tokenizer)
    tok = processor.tokenizer
    assert yes == [tok.convert_tokens_to_ids("yes")]
    assert no == [tok.convert_tokens_to_ids("no")]
    assert tok("Yes", add_special_tokens=False)["input_ids"] == yes  # lowercasing: one variant


def test_adapter_for_unknown_model_type() -> None:
    with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'; supported: llava, paligemma, qwen2_vl"):
        adapter_for(GPT2Config())


# A SentencePiece / byte-level style vocabulary: "▁" (SentencePiece) and "Ġ" (GPT-2 byte-level) mark a word
# start; case varies; special tokens must never count, even one whose text reads "yes".
SPIECE_VOCAB = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<yes>",  # 4  special, spelled like yes: excluded
    "▁YES",  # 5  special whose text reads "yes": excluded
    "▁Yes", "Yes", "yes", "Ġyes", " yes",  # 6-10  yes
    "▁No", "NO", "Ġno", "no", "▁no",  # 11-15 no
    "yesterday", "▁Yesterday", "eyes", "yes.", "▁yes!", "yes▁",  # 16-21 distractors
    "▁note", "▁not", "Ġnot", "nope", "▁None", "No.", "ĠNOT", "know",  # 22-29 distractors
]
SPIECE_YES, SPIECE_NO = [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]


def _spiece_tokenizer(vocab: list[str] = SPIECE_VOCAB):
    """A real fast tokenizer over ``vocab`` (WordLevel model, whitespace split), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<yes>", "▁YES"]})
    assert tokenizer.get_vocab() == {piece: i for i, piece in enumerate(vocab)}  # nothing was appended
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2, 3, 4, 5]
    return tokenizer


def test_yes_no_token_ids_on_a_sentencepiece_style_vocabulary() -> None:
    from transformers import LlavaConfig

    adapter = adapter_for(LlavaConfig())
    tokenizer = _spiece_tokenizer()
    assert tokenizer.tokenize("▁Yes Ġyes ▁YES yesterday") == ["▁Yes", "Ġyes", "▁YES", "yesterday"]
    assert adapter.yes_no_token_ids(tokenizer) == (SPIECE_YES, SPIECE_NO)
    assert adapter.yes_no_token_ids(tokenizer) == (SPIECE_YES, SPIECE_NO)  # cached: same answer

    # A piece added later is seen (the cache is keyed on the vocabulary size); a non-word piece is not.
    tokenizer.add_tokens(["yEs", "Nah"])
    added = tokenizer.convert_tokens_to_ids("yEs")
    assert added == len(SPIECE_VOCAB)
    assert adapter.yes_no_token_ids(tokenizer) == ([*SPIECE_YES, added], SPIECE_NO)


def test_yes_no_token_ids_refuse_a_vocabulary_whose_only_yes_is_special() -> None:
    from transformers import LlavaConfig

    readable_yes = {SPIECE_VOCAB[i] for i in SPIECE_YES}
    tokenizer = _spiece_tokenizer([piece for piece in SPIECE_VOCAB if piece not in readable_yes])
    with pytest.raises(ValueError, match="no 'yes' token"):  # not an empty id list (logsumexp of nothing)
        adapter_for(LlavaConfig()).yes_no_token_ids(tokenizer)
