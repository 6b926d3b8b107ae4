"""Claim: K = 10 sampled answers with prefix sharing cost at most 2x one greedy extraction (the paper: 10x).

On the same inputs (the first ``--n`` questions of the benchmark's random setting, batches of 16, temperature 0.7,
top-p 0.9, 8 new tokens), each variant timed over all inputs, interleaved, median of ``--repeats`` after a warm-up:

- ``greedy_extraction``: the book's greedy pass (:func:`~vrp_utils.extract.engine.run_batch`, attention rows and
  hidden states recorded) -- the unit every ratio divides by;
- ``greedy_answer``: the same pass recording answers only;
- ``prefix_shared_k10``: ``run_batch`` with ``samples=10`` (the greedy answer plus ten samples from one prefill per
  input; :mod:`vrp_utils.extract.sampling`);
- ``num_return_sequences_10``: ``generate(do_sample=True, num_return_sequences=10)`` (the prompt repeated ten times
  in the batch);
- ``ten_separate_passes``: ten ``generate(do_sample=True)`` calls.

Every variant includes the processor call. Prints a table and writes ``benchmarks/results/bench_sampling.json``.

Usage: ``python benchmarks/bench_sampling.py [--models zoo-llava,zoo-paligemma,zoo-qwen2-vl --n 64 --repeats 3
--threads 1]`` (needs the built zoo, ``make models``; about 2 minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vrp_utils.extract.engine import ExtractionSettings, run_batch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_sampling.json"
K, TEMPERATURE, TOP_P, MAX_NEW_TOKENS, BATCH = 10, 0.7, 0.9, 8, 16


def variants(loaded, images, questions):
    adapter, processor, model = loaded.adapter, loaded.processor, loaded.model
    sampling = ExtractionSettings(attention=False, hidden=False, samples=K, temperature=TEMPERATURE, top_p=TOP_P,
                                  max_new_tokens=MAX_NEW_TOKENS)

    def batches():
        for start in range(0, len(images), BATCH):
            yield images[start:start + BATCH], questions[start:start + BATCH]

    def engine(settings):
        def run():
            for imgs, qs in batches():
                run_batch(loaded, imgs, qs, settings)
        return run

    def generate(sequences: int, calls: int):
        def run():
            kwargs = adapter.generation_kwargs(processor, MAX_NEW_TOKENS)
            kwargs.update(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, num_return_sequences=sequences)
            with torch.no_grad():
                for imgs, qs in batches():
                    for _ in range(calls):
                        inputs = adapter.build_inputs(processor, imgs, qs)
                        model.generate(**adapter.model_inputs(inputs), **kwargs)
        return run

    return {
        "greedy_extraction": engine(ExtractionSettings(max_new_tokens=MAX_NEW_TOKENS)),
        "greedy_answer": engine(ExtractionSettings(attention=False, hidden=False, max_new_tokens=MAX_NEW_TOKENS)),
        "prefix_shared_k10": engine(sampling),
        "num_return_sequences_10": generate(K, 1),
        "ten_separate_passes": generate(1, K),
    }


def measure(model_name: str, n: int, repeats: int) -> dict:
    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.models.loading import load_model

    loaded = load_model(model_name)
    loaded.model.eval()
    split = load_benchmark("random").select(range(n))
    images = [row["image"].convert("RGB") for row in split]
    questions = list(split["question"])
    runs = variants(loaded, images, questions)
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    unit = medians["greedy_extraction"]
    return {
        "model": model_name,
        "n_inputs": n,
        "seconds_median": medians,
        "seconds_all": times,
        "seconds_per_input": {name: value / n for name, value in medians.items()},
        "ratio_to_greedy_extraction": {name: value / unit for name, value in medians.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="zoo-llava,zoo-paligemma,zoo-qwen2-vl")
    parser.add_argument("--n", type=int, default=64, help="inputs (benchmark questions, random setting)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(name.strip(), args.n, args.repeats) for name in args.models.split(",") if name.strip()]
    print(f"{'model':<16} " + " ".join(f"{name:>24}" for name in results[0]["ratio_to_greedy_extraction"]))
    for entry in results:
        print(f"{entry['model']:<16} " + " ".join(f"{v:>23.2f}x" for v in entry["ratio_to_greedy_extraction"].values()))
    payload = {
        "claim": "prefix-shared K=10 sampling costs at most 2x one greedy extraction",
        "settings": {"k": K, "temperature": TEMPERATURE, "top_p": TOP_P, "max_new_tokens": MAX_NEW_TOKENS,
                     "batch_size": BATCH, "threads": args.threads, "repeats": args.repeats, "n_inputs": args.n},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
