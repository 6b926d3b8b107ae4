"""Claim: extracting one example costs at most 1.3x one plain sdpa forward, with O(layers x heads x N) memory.

At LLaVA-1.5 shapes (336 px images, patch 14 -> 576 image tokens, plus about 40 text tokens; the language model
narrow and shallow so that it runs on a CPU: hidden 256, 4 layers, 8 heads) this compares, on the same input:

(a) one plain sdpa forward (prefill, no outputs requested),
(b) the engine's capture of the prefill step: :class:`~vrp_utils.extract.attention.AttentionRecorder` plus the
    engine's hidden-state hooks, around the same forward -- the claim is (b)/(a) <= 1.3,
(c) the naive way: eager attention with ``output_attentions=True, output_hidden_states=True``;

memory: the bytes of attention/hidden data each approach materialises per example, and the peak RSS increase
of one forward of each, each in a fresh subprocess (kernel peak-RSS mark, ``VmHWM``); and a full greedy
extraction of one example (:func:`~vrp_utils.extract.engine.run_batch`) against a plain ``generate`` with the same
``max_new_tokens`` (both including the processor call). Timings are medians over ``--repeats`` interleaved
repetitions after warm-up, with a fixed number of threads. Prints a table and writes
``benchmarks/results/bench_extraction.json``.

Usage: ``python benchmarks/bench_extraction.py [--threads 1 --repeats 7]`` (about 1-2 minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vrp_utils.data.benchmark import vocabulary
from vrp_utils.extract.attention import AttentionRecorder
from vrp_utils.extract.engine import ExtractionSettings, run_batch
from vrp_utils.models.families import build_family
from vrp_utils.models.loading import LoadedModel, load_model

RESULTS = Path(__file__).resolve().parent / "results" / "bench_extraction.json"
CLAIM_RATIO = 1.3
#: A yes/no question of about 40 text tokens, written with the tiny tokenizer's words only.
QUESTION = (
    "Is there a cup , a fork , a knife , a plate , a lamp , a clock , a book , a chair , an apple , "
    "a banana , a kite , a tree , an umbrella in the image ?"
)


# --------------------------------------------------------------------------------------------------- setup
def build_model(directory: Path, hidden: int, layers: int, heads: int, seed: int) -> Path:
    """A random-weight LLaVA with the paper's image geometry (336 px, patch 14), saved like a zoo model."""
    from transformers import AutoModelForImageTextToText

    config, processor = build_family("llava", vocabulary(), geometry="paper", hidden=hidden, layers=layers, heads=heads)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def example_image(seed: int):
    """A deterministic 336x336 RGB noise image (content does not matter for timing)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (336, 336, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def load_pair(model_dir: Path) -> tuple[LoadedModel, torch.nn.Module]:
    loaded = load_model(model_dir)
    eager = loaded.adapter.model_class.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True)
    return loaded, eager.eval()


# ------------------------------------------------------------------------------------------------ variants
def hidden_hooks(model: torch.nn.Module, sink: list[torch.Tensor]) -> list[Any]:
    """The engine's hidden-state capture (as in ``run_batch``): each block's output at the last position."""

    def record(module, args, output) -> None:
        states = output[0] if isinstance(output, tuple) else output
        sink.append(states[:, -1, :].float().cpu())

    return [layer.register_forward_hook(record) for layer in model.get_decoder().layers]


@torch.no_grad()
def plain_forward(loaded: LoadedModel, eager, inputs: dict, positions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    loaded.model(**inputs)
    return {}


@torch.no_grad()
def capture_forward(loaded: LoadedModel, eager, inputs: dict, positions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    hidden: list[torch.Tensor] = []
    handles = hidden_hooks(loaded.model, hidden)
    try:
        with AttentionRecorder(loaded.model, positions) as recorder:
            loaded.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {"attention_rows": recorder.rows(), "hidden_last": torch.stack(hidden, dim=1)}


@torch.no_grad()
def naive_forward(loaded: LoadedModel, eager, inputs: dict, positions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    return {
        "attentions": torch.stack(out.attentions),  # [layers, batch, heads, N, N]
        "hidden_states": torch.stack(out.hidden_states),  # [layers + 1, batch, N, width]
    }


VARIANTS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "plain_sdpa": plain_forward,
    "capture_sdpa": capture_forward,
    "naive_eager": naive_forward,
}


def kept_bytes(outputs: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in outputs.values())


def prepare(model_dir: Path) -> tuple[LoadedModel, torch.nn.Module, dict, list[torch.Tensor]]:
    loaded, eager = load_pair(model_dir)
    inputs = loaded.adapter.model_inputs(loaded.adapter.build_inputs(loaded.processor, [example_image(0)], [QUESTION]))
    positions = [loaded.adapter.image_token_positions(inputs["input_ids"][0])]
    return loaded, eager, inputs, positions


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(variant: str, model_dir: Path, threads: int) -> None:
    """Fresh process: peak resident memory added by ONE forward of ``variant``.

    Run with ``MALLOC_MMAP_THRESHOLD_`` fixed (set by the parent), so large buffers are fresh pages returned on
    free, after one warm-up plain forward (one-time allocations paid); the kernel's peak-RSS mark is reset
    (``/proc/self/clear_refs``) just before the forward, so the loading peak does not hide it.
    """
    import gc

    torch.set_num_threads(threads)
    loaded, eager, inputs, positions = prepare(model_dir)
    plain_forward(loaded, eager, inputs, positions)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    outputs = VARIANTS[variant](loaded, eager, inputs, positions)
    peak = _status_kib("VmHWM")
    print(json.dumps({"variant": variant, "peak_rss_delta_bytes": (peak - before) * 1024, "kept_bytes": kept_bytes(outputs)}))


# -------------------------------------------------------------------------------------------------- timing
def interleaved_medians(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function; repetitions interleaved so background load hits every variant alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for stable timings)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.model_dir, args.threads)
        return 0

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-extraction-") as tmp:
        model_dir = build_model(Path(tmp) / "llava-paper-geometry", args.hidden, args.layers, args.heads, args.seed)
        loaded, eager, inputs, positions = prepare(model_dir)
        text = loaded.model.config.get_text_config()
        n_image = len(positions[0])
        sequence = int(inputs["input_ids"].shape[1])

        # Same numbers from the capture and from eager attention (a wrong capture would make the timing moot).
        captured = capture_forward(loaded, eager, inputs, positions)
        naive = naive_forward(loaded, eager, inputs, positions)
        eager_rows = naive["attentions"][:, 0, :, -1][..., positions[0]]  # [layers, heads, image tokens]
        row_diff = float((captured["attention_rows"][0, 0] - eager_rows).abs().max())
        hidden_diff = float((captured["hidden_last"][0, :-1] - naive["hidden_states"][1:-1, 0, -1]).abs().max())

        # (a), (b), (c): one prefill forward each, same input.
        forward_s = interleaved_medians(
            {name: (lambda f=f: f(loaded, eager, inputs, positions)) for name, f in VARIANTS.items()}, args.repeats
        )

        # Full greedy extraction of one example vs plain generate (both build the inputs from the image).
        image = example_image(0)
        settings = ExtractionSettings(max_new_tokens=args.max_new_tokens, batch_size=1)
        generation = loaded.adapter.generation_kwargs(loaded.processor, args.max_new_tokens)

        @torch.no_grad()
        def plain_generate() -> torch.Tensor:
            batch = loaded.adapter.build_inputs(loaded.processor, [image], [QUESTION])
            return loaded.model.generate(**loaded.adapter.model_inputs(batch), **generation)

        new_tokens = int(plain_generate().shape[1] - sequence)
        extraction = run_batch(loaded, [image], [QUESTION], settings)
        generate_s = interleaved_medians(
            {"plain_generate": plain_generate, "run_batch": lambda: run_batch(loaded, [image], [QUESTION], settings)},
            args.repeats,
            warmup=1,
        )
        stored_bytes = sum(a.nbytes for a in extraction.arrays[0].values())

        # Peak memory of one forward of each variant, each in a fresh process.
        memory: dict[str, dict[str, int]] = {}
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--memory-child", variant, "--model-dir", str(model_dir), "--threads", str(args.threads)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            memory[variant] = json.loads(result.stdout.strip().splitlines()[-1])

    plain, capture, naive_s = forward_s["plain_sdpa"], forward_s["capture_sdpa"], forward_s["naive_eager"]
    results = {
        "claim": f"extraction (capture of the prefill step) <= {CLAIM_RATIO}x one plain sdpa forward; memory O(layers x heads x N)",
        "shapes": {
            "image_tokens": n_image, "text_tokens": sequence - n_image, "sequence": sequence,
            "hidden": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
            "vision": "CLIP 336 px / patch 14, hidden 32, 1 layer",
        },
        "environment": {
            "threads": args.threads, "repeats": args.repeats, "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "forward_median_s": forward_s,
        "ratios": {
            "capture_over_plain": capture / plain,
            "naive_over_plain": naive_s / plain,
            "run_batch_over_generate": generate_s["run_batch"] / generate_s["plain_generate"],
        },
        "generation": {"max_new_tokens": args.max_new_tokens, "generated_tokens": new_tokens, "median_s": generate_s},
        "memory_bytes": {
            "kept_capture": kept_bytes(captured),
            "kept_naive": kept_bytes(naive),
            "stored_per_example_run_batch": stored_bytes,
            "peak_rss_delta": {name: m["peak_rss_delta_bytes"] for name, m in memory.items()},
        },
        "checks": {"attention_rows_max_abs_diff_vs_eager": row_diff, "hidden_max_abs_diff_vs_output_hidden_states": hidden_diff},
        "claim_holds": capture / plain <= CLAIM_RATIO,
        "runtime_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    mib = 1 / 2**20
    rss = results["memory_bytes"]["peak_rss_delta"]
    print(f"LLaVA-1.5 shapes: {n_image} image + {sequence - n_image} text tokens (N={sequence}); LM hidden {text.hidden_size}, "
          f"{text.num_hidden_layers} layers, {text.num_attention_heads} heads; {args.threads} thread(s), median of {args.repeats}")
    print(f"{'variant':<34}{'time (ms)':>11}{'x plain':>9}{'kept (MiB)':>12}{'peak RSS +(MiB)':>17}")
    rows = [
        ("(a) plain sdpa forward", plain, 0, rss["plain_sdpa"]),
        ("(b) capture: recorder + hooks", capture, kept_bytes(captured), rss["capture_sdpa"]),
        ("(c) naive: eager + output_*", naive_s, kept_bytes(naive), rss["naive_eager"]),
    ]
    for name, seconds, kept, peak in rows:
        print(f"{name:<34}{seconds * 1e3:>11.1f}{seconds / plain:>9.2f}{kept * mib:>12.3f}{peak * mib:>17.1f}")
    ratio = generate_s["run_batch"] / generate_s["plain_generate"]
    print(f"{'plain generate':<34}{generate_s['plain_generate'] * 1e3:>11.1f}")
    print(f"{'run_batch (full extraction)':<34}{generate_s['run_batch'] * 1e3:>11.1f}{ratio:>9.2f}"
          f"  ({new_tokens} new tokens; stored {stored_bytes / 1024:.1f} KiB/example)")
    print(f"kept bytes naive / capture: {kept_bytes(naive) / kept_bytes(captured):.0f}x; "
          f"rows vs eager max |diff| {row_diff:.1e}, hidden {hidden_diff:.1e}")
    verdict = "holds" if results["claim_holds"] else "does NOT hold"
    print(f"claim (b)/(a) = {capture / plain:.2f} <= {CLAIM_RATIO}: {verdict}; wrote {args.out} in {results['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
