"""The family adapter interface: the only place that knows how a VLM family lays out its inputs.

A training loop or extraction engine holds a :class:`FamilyAdapter` and never
branches on the family itself. The adapter knows the prompt format, how
image tokens sit in ``input_ids`` and which original-image pixels each image
token covers.

Conventions: batches are LEFT padded, so for generation inputs every prompt
ends at the last column and the model's next token is the first answer token.
Training inputs (``answers`` given) are prompt + answer + end-of-turn token,
also left padded, with ``labels`` = -100 everywhere but the answer and its end
token. Image sizes are ``(width, height)`` as PIL's ``Image.size``; boxes are
``(x0, y0, x1, y1)`` floats in original-image pixels.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PretrainedConfig, PreTrainedModel, ProcessorMixin

IGNORE_INDEX = -100
#: Vocabulary-piece prefixes meaning "starts a word" in common tokenizers (SentencePiece, byte-level BPE).
_WORD_START_MARKS = ("\u2581", "\u0120", " ")


class FamilyAdapter(ABC):
    """Family-specific input layout, image-token geometry and generation settings."""

    model_type: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type[ProcessorMixin]]

    def __init__(self, config: PretrainedConfig) -> None:
        if config.model_type != self.model_type:
            raise ValueError(f"{type(self).__name__} needs a {self.model_type!r} config, got {config.model_type!r}")
        self.config = config

    # ----------------------------------------------------------------- prompts
    @abstractmethod
    def prompt(self, processor: ProcessorMixin, question: str) -> str:
        """The family's prompt for one image and one question, ending where the answer starts."""

    @abstractmethod
    def answer_text(self, processor: ProcessorMixin, answer: str) -> str:
        """Text that follows the prompt in training: the answer plus the end-of-turn token."""

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    # ------------------------------------------------------------------ inputs
    def build_inputs(
        self,
        processor: ProcessorMixin,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
    ) -> BatchFeature:
        """Batched, left-padded model inputs; with ``answers``, training inputs with ``labels``."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"{len(answers)} answers but {len(questions)} questions")
        if not questions:
            raise ValueError("build_inputs needs at least one example")
        images = [img.convert("RGB") for img in images]
        if answers is None:
            prompts = [self.prompt(processor, q) for q in questions]
            inputs = self._encode(processor, images, prompts)
            inputs.pop("labels", None)
        else:
            inputs = self._encode_training(processor, images, list(questions), list(answers))
        self._check_known_words(processor, inputs, questions, answers)
        return inputs

    def follow_up_prompt(self, processor: ProcessorMixin, question: str) -> str:
        """A later user turn about the same image: its text after the previous answer, ending where its answer starts."""
        raise NotImplementedError(f"{self.model_type}: multi-turn conversations are not defined")

    def build_conversations(
        self,
        processor: ProcessorMixin,
        images: Sequence[Image.Image],
        conversations: Sequence[Sequence[tuple[str, str]]],
    ) -> BatchFeature:
        """Training inputs for one multi-turn conversation per image, with ``labels`` on every answer.

        Turn one is exactly the single-question prompt of :meth:`build_inputs` (what evaluation
        sees); later turns use the family's own follow-up format. Why: one image forward then
        trains several yes/no decisions, which the zoo needs to leave chance within its budget.
        """
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} images but {len(conversations)} conversations")
        if not conversations or any(len(turns) == 0 for turns in conversations):
            raise ValueError("build_conversations needs at least one conversation, each with at least one turn")
        tokenizer = processor.tokenizer
        # A batch repeats a few dozen distinct texts (questions, answers) hundreds of times: render and
        # tokenize each once (in the zoo's training those calls were about half of building a batch).
        rendered: dict[tuple[str, str], str] = {}
        token_ids: dict[str, list[int]] = {}

        def render(method, text: str) -> str:
            key = (method.__name__, text)
            if key not in rendered:
                rendered[key] = method(processor, text)
            return rendered[key]

        def tokens(text: str) -> list[int]:
            if text not in token_ids:
                token_ids[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
            return token_ids[text]

        prompts, tails = [], []
        for turns in conversations:
            (question, answer), *later = turns
            pieces = [(render(self.answer_text, answer), True)]
            for question_k, answer_k in later:
                pieces += [(render(self.follow_up_prompt, question_k), False), (render(self.answer_text, answer_k), True)]
            prompts.append(render(self.prompt, question))
            tails.append(pieces)
        inputs = self._encode_with_tails(processor, [img.convert("RGB") for img in images], prompts,
                                         ["".join(text for text, _ in pieces) for pieces in tails])
        ids = inputs["input_ids"]
        width = ids.shape[1]
        labels = [[IGNORE_INDEX] * width for _ in tails]
        for row, pieces in enumerate(tails):
            piece_ids = [tokens(text) for text, _ in pieces]
            expected = [t for p in piece_ids for t in p]
            column = width - len(expected)
            if ids[row, column:].tolist() != expected:
                raise ValueError(f"conversation {row}: its turns do not tokenize the same inside the sequence and alone")
            for (_, is_answer), p in zip(pieces, piece_ids):
                if is_answer:
                    labels[row][column : column + len(p)] = p
                column += len(p)
        inputs["labels"] = torch.tensor(labels, dtype=ids.dtype)
        flat = [" / ".join(f"{q} {a}" for q, a in turns) for turns in conversations]
        self._check_known_words(processor, inputs, flat, None)
        return inputs

    def _encode_with_tails(
        self, processor: ProcessorMixin, images: list[Image.Image], prompts: list[str], tails: list[str]
    ) -> BatchFeature:
        """Encode prompt + tail text per row (left-padded); families with a prefix/suffix split override this."""
        return self._encode(processor, images, [p + t for p, t in zip(prompts, tails)])

    def _encode(self, processor: ProcessorMixin, images: list[Image.Image], texts: list[str], **kwargs: Any) -> BatchFeature:
        return processor(
            images=images, text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs
        )

    def _encode_training(
        self, processor: ProcessorMixin, images: list[Image.Image], questions: list[str], answers: list[str]
    ) -> BatchFeature:
        """Prompt + answer in one text; the answer's tokens are the tail of each (left-padded) row."""
        tokenizer = processor.tokenizer
        tails = [self.answer_text(processor, a) for a in answers]
        texts = [self.prompt(processor, q) + t for q, t in zip(questions, tails)]
        inputs = self._encode(processor, images, texts)
        ids = inputs["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, tail in enumerate(tails):
            tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
            n = len(tail_ids)
            if n == 0 or ids[i, -n:].tolist() != tail_ids:
                raise ValueError(
                    f"example {i}: answer {answers[i]!r} does not tokenize the same inside the prompt "
                    f"({tokenizer.convert_ids_to_tokens(ids[i, -max(n, 1):].tolist())}) and alone "
                    f"({tokenizer.convert_ids_to_tokens(tail_ids)})"
                )
            labels[i, -n:] = ids[i, -n:]
        inputs["labels"] = labels
        return inputs

    def _check_known_words(
        self,
        processor: ProcessorMixin,
        inputs: BatchFeature,
        questions: Sequence[str],
        answers: Sequence[str] | None,
    ) -> None:
        """Out-of-vocabulary words would silently become <unk>: refuse instead."""
        unk = processor.tokenizer.unk_token_id
        if unk is None:
            return
        rows = (inputs["input_ids"] == unk).any(dim=1).nonzero().flatten().tolist()
        if rows:
            i = rows[0]
            text = questions[i] + ("" if answers is None else f" / {answers[i]}")
            raise ValueError(
                f"example {i} ({text!r}) has words outside the tokenizer's vocabulary "
                f"({len(rows)} example(s) affected); rebuild the processor with those words"
            )

    def model_inputs(self, inputs: BatchFeature) -> dict[str, torch.Tensor]:
        """The tensors a forward/generate call takes (everything but ``labels``)."""
        return {k: v for k, v in inputs.items() if k != "labels"}

    def answer_start(self, inputs: BatchFeature, index: int) -> int:
        """Column of the first answer token of example ``index``.

        Generation inputs: the sequence length (the answer is generated there).
        Training inputs: the first labelled column.
        """
        seq_len = int(inputs["input_ids"].shape[1])
        if "labels" not in inputs:
            return seq_len
        labelled = (inputs["labels"][index] != IGNORE_INDEX).nonzero().flatten()
        if labelled.numel() == 0:
            raise ValueError(f"example {index} has no labelled answer tokens")
        return int(labelled[0])

    # ------------------------------------------------------------ image tokens
    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the image tokens in one sequence, found from the ids."""
        if input_ids.dim() != 1:
            raise ValueError(f"image_token_positions takes one sequence (1-D), got shape {tuple(input_ids.shape)}")
        return (input_ids == self.image_token_id).nonzero().flatten()

    @abstractmethod
    def patch_grid(self, inputs: BatchFeature, index: int) -> tuple[int, int]:
        """(rows, cols) of the image tokens of example ``index``; row-major in ``input_ids``."""

    @abstractmethod
    def patch_boxes(self, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        """``[rows*cols, 4]`` boxes (x0, y0, x1, y1) in the original image, one per image token, row-major."""

    def check_processor(self, processor: ProcessorMixin) -> None:
        """Raise if ``processor`` does not match the config (token ids, vocabulary, image geometry).

        The geometry check matters because :meth:`patch_boxes` assumes the
        family's standard resize; a processor that resizes differently would make
        every box wrong without any error.
        """
        if not isinstance(processor, self.processor_class):
            raise TypeError(f"{self.model_type} needs a {self.processor_class.__name__}, got {type(processor).__name__}")
        if processor.image_token_id != self.image_token_id:
            raise ValueError(
                f"processor image token id {processor.image_token_id} != config image token id {self.image_token_id}"
            )
        vocab = self.config.get_text_config().vocab_size
        if len(processor.tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(processor.tokenizer)} tokens but the model's vocabulary is {vocab}")
        self._check_geometry(processor)

    @abstractmethod
    def _check_geometry(self, processor: ProcessorMixin) -> None:
        """Family part of :meth:`check_processor`."""

    @staticmethod
    def _grid_boxes(x0: float, y0: float, width: float, height: float, grid: tuple[int, int]) -> np.ndarray:
        """Split the rectangle (x0, y0, width, height) into ``grid`` equal cells, row-major."""
        rows, cols = grid
        if rows <= 0 or cols <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        xs = x0 + np.arange(cols + 1) * (width / cols)
        ys = y0 + np.arange(rows + 1) * (height / rows)
        r, c = np.divmod(np.arange(rows * cols), cols)
        return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)

    # -------------------------------------------------------------- generation
    def yes_no_token_ids(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        """Ids of every vocabulary piece that reads "yes" / "no" (any case, with or without a word-start mark).

        Scans the vocabulary once per tokenizer (cached on the adapter).
        """
        cache = self.__dict__.setdefault("_yes_no_cache", {})
        hit = cache.get(id(tokenizer))
        if hit is None or hit[0]() is not tokenizer or hit[1] != len(tokenizer):
            hit = (weakref.ref(tokenizer), len(tokenizer), self._scan_yes_no(tokenizer))
            cache[id(tokenizer)] = hit
        yes, no = hit[2]
        return list(yes), list(no)

    @staticmethod
    def _scan_yes_no(tokenizer: Any) -> tuple[list[int], list[int]]:
        found: dict[str, set[int]] = {"yes": set(), "no": set()}
        special = set(tokenizer.all_special_ids)
        for piece, idx in tokenizer.get_vocab().items():
            key = piece.lstrip("".join(_WORD_START_MARKS)).lower()
            if key in found and idx not in special:
                found[key].add(int(idx))
        for key, ids in found.items():
            if not ids:
                raise ValueError(f"the tokenizer has no {key!r} token; the yes/no logit margin is undefined")
        return sorted(found["yes"]), sorted(found["no"])

    def generation_kwargs(self, processor: ProcessorMixin, max_new_tokens: int = 8) -> dict[str, Any]:
        """Greedy decoding that stops at the family's end-of-turn token."""
        tokenizer = processor.tokenizer
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }

    def load_processor(self, path: str, **kwargs: Any) -> ProcessorMixin:
        """Load this family's processor from a directory saved with ``save_pretrained``."""
        return self.processor_class.from_pretrained(path, **kwargs)
