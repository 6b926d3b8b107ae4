"""Claim: capturing last-row attention with AttentionRecorder costs O(layers x heads x N) memory, eager O(.. x N^2).

Builds a small random LLaVA (CLIP + Llama) whose prompt holds ``--image-tokens`` image tokens, runs one prefill
(a) with ``attn_implementation="eager", output_attentions=True`` and (b) under sdpa with the recorder, and prints
the bytes each keeps, the peak accelerator memory when on CUDA, wall time, the ratios, and the max abs difference
of the captured rows. Usage: ``python benchmarks/bench_attention_capture.py [--image-tokens 576 --text-tokens 64]``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vrp_utils.extract.attention import AttentionRecorder

IMAGE_TOKEN = 99


def build(image_tokens: int, layers: int, seed: int) -> tuple[LlavaForConditionalGeneration, LlavaForConditionalGeneration]:
    side = int(round(image_tokens**0.5))
    if side * side != image_tokens:
        raise ValueError(f"--image-tokens must be a square number, got {image_tokens}")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=side * 2, patch_size=2, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=8192, pad_token_id=0, eos_token_id=None,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=image_tokens)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(copy.deepcopy(config)).eval()
    eager = LlavaForConditionalGeneration._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, eager = build(args.image_tokens, args.layers, args.seed)
    model.to(device), eager.to(device)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.cat([torch.tensor([1]), torch.full((args.image_tokens,), IMAGE_TOKEN), torch.randint(2, 90, (args.text_tokens,), generator=g)])
    side = model.config.vision_config.image_size
    inputs = {"input_ids": ids[None].to(device), "pixel_values": torch.randn(1, 3, side, side, generator=g).to(device)}
    image_positions = [(ids == IMAGE_TOKEN).nonzero().flatten()]
    n = ids.numel()

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
        return out, time.perf_counter() - start, peak

    with torch.no_grad():
        timed(lambda: eager(**inputs, output_attentions=True))  # warm-up
        out, eager_s, eager_peak = timed(lambda: eager(**inputs, output_attentions=True))
        eager_rows = torch.stack([a[0, :, -1, image_positions[0]] for a in out.attentions]).float().cpu()
        eager_bytes = sum(a.numel() * a.element_size() for a in out.attentions)
        del out

        def record():
            with AttentionRecorder(model, image_positions) as recorder:
                model(**inputs)
            return recorder.rows()

        record()  # warm-up
        rows, rec_s, rec_peak = timed(record)
    rec_bytes = rows.numel() * rows.element_size()
    diff = (rows[0, 0] - eager_rows).abs().max().item()

    print(f"device={device} sequence={n} image_tokens={args.image_tokens} layers={args.layers} heads=8")
    print(f"eager output_attentions: kept {eager_bytes / 2**20:.2f} MiB, {eager_s * 1e3:.1f} ms, peak {eager_peak / 2**20:.1f} MiB")
    print(f"sdpa + AttentionRecorder: kept {rec_bytes / 2**20:.4f} MiB, {rec_s * 1e3:.1f} ms, peak {rec_peak / 2**20:.1f} MiB")
    print(f"ratio kept bytes eager/recorder = {eager_bytes / rec_bytes:.0f}x (N^2/K = {n * n / args.image_tokens:.0f})")
    print(f"ratio time eager/recorder = {eager_s / rec_s:.2f}x; peak ratio = {eager_peak / rec_peak:.2f}x")
    print(f"max |rows - eager rows| = {diff:.2e}")


if __name__ == "__main__":
    main()
