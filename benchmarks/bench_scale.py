"""Claims: extraction gets faster per example with the batch size, costs about one plain ``generate`` at every
batch size, and two processes on two cores beat one, with a merge that costs little.

Three measurements, each in one run of this script (ratios within the run, so background load on a shared
machine hits every variant alike):

1. Batch scaling: for batch sizes 1, 4, 16, 32, a fresh subprocess per (model, batch size) times the engine's
   pass (:func:`~vrp_utils.extract.engine.run_batch`: answer, attention rows at every step, hidden states, token
   statistics) over the same ``--n`` examples, and a plain ``generate`` (same processor call, same
   ``max_new_tokens``) interleaved with it; it records examples per second (relative to batch 1) and the peak
   resident memory the pass adds over the loaded model (kernel ``VmHWM``, reset just before the pass). Models: a
   trained zoo model (``zoo-llava``, 64 image tokens, a 2-layer width-128 language model) and a random-weight
   model of LLaVA-1.5's image geometry (336 px, patch 14: 576 image tokens) with ``bench_extraction.py``'s
   language model (hidden 256, 4 layers, 8 heads): the shapes of its 1.05x claim at batch 1.
2. Processes, on the LLaVA-1.5-shapes model (the zoo's tiny model extracts 384 examples in 3 s, less than
   the start-up of a process): ``python -m vrp_utils.extract`` over ``--limit`` examples with one process on
   one core, one process with two threads, and ``accelerate launch --multi_gpu --num_processes 2`` (two CPU ranks, one thread
   each), wall time from the command line (imports and model loading included) and the merge's own time
   (printed by the main process); the merged store must equal the one-process store byte for byte.

Usage (about 8-10 minutes on two shared cores; ``--skip batch`` or ``--skip processes`` reruns one part and
keeps the other part's numbers in the results file)::

    OMP_NUM_THREADS=1 VRP_DATA_DIR=data .venv/bin/python benchmarks/bench_scale.py

Writes ``benchmarks/results/bench_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "bench_scale.json"
BATCH_SIZES = (1, 4, 16, 32)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extraction import _status_kib, build_model, interleaved_medians  # noqa: E402  (its model and rules)


# ------------------------------------------------------------------------------------------- batch scaling
def batch_child(model: str, batch_size: int, n: int, max_new_tokens: int, repeats: int) -> dict[str, Any]:
    """One fresh process: peak memory of one pass over ``n`` examples at ``batch_size``, then the timings."""
    import gc

    import torch

    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.extract.engine import ExtractionSettings, run_batch
    from vrp_utils.models.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)
    rows = load_benchmark("random").select(range(n))
    images, questions = [row["image"].convert("RGB") for row in rows], list(rows["question"])
    settings = ExtractionSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    adapter, processor = loaded.adapter, loaded.processor
    batches = [(images[i : i + batch_size], questions[i : i + batch_size]) for i in range(0, n, batch_size)]

    def extraction() -> None:
        for batch_images, batch_questions in batches:
            run_batch(loaded, batch_images, batch_questions, settings)

    @torch.no_grad()
    def generate() -> None:
        generation = adapter.generation_kwargs(processor, max_new_tokens)
        for batch_images, batch_questions in batches:
            inputs = adapter.model_inputs(adapter.build_inputs(processor, batch_images, batch_questions))
            loaded.model.generate(**inputs, **generation)

    run_batch(loaded, images[:batch_size], questions[:batch_size], settings)  # one-time allocations paid
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    extraction()
    peak = _status_kib("VmHWM")
    medians = interleaved_medians({"extraction": extraction, "generate": generate}, repeats, warmup=1)
    return {"model": model, "batch_size": batch_size, "n": n, "median_s": medians,
            "examples_per_s": n / medians["extraction"], "extraction_over_generate": medians["extraction"] / medians["generate"],
            "loaded_rss_bytes": before * 1024, "peak_rss_delta_bytes": (peak - before) * 1024}


def batch_scaling(models: dict[str, str], n: int, max_new_tokens: int, repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Every (model, batch size) in its own subprocess; speeds relative to the same model's batch 1."""
    out: dict[str, list[dict[str, Any]]] = {}
    for label, model in models.items():
        runs = []
        for batch_size in BATCH_SIZES:
            command = [sys.executable, __file__, "--batch-child", model, "--batch-size", str(batch_size), "--n", str(n),
                       "--max-new-tokens", str(max_new_tokens), "--repeats", str(repeats)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{label} batch {batch_size}: {runs[-1]['examples_per_s']:.1f} ex/s, "
                  f"{runs[-1]['extraction_over_generate']:.3f}x generate, peak +{runs[-1]['peak_rss_delta_bytes'] / 2**20:.0f} MiB",
                  flush=True)
        for run in runs:
            run["speed_vs_batch_1"] = run["examples_per_s"] / runs[0]["examples_per_s"]
        out[label] = runs
    return out


# ------------------------------------------------------------------------------------------------ processes
def _cli(model: str, limit: int, batch_size: int, out: Path, variant: str) -> dict[str, Any]:
    """One extraction from the command line; wall seconds, the run's own seconds, the merge's seconds."""
    args = ["--model", model, "--split", "random", "--limit", str(limit), "--batch-size", str(batch_size), "--out", str(out)]
    threads = {"1 process, 1 thread": "1", "1 process, 2 threads": "2", "2 processes, 1 thread each": "1"}[variant]
    if variant.startswith("2 processes"):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vrp_utils.extract", *args]
    else:
        command = [sys.executable, "-m", "vrp_utils.extract", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                          env=dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(REPO_ROOT)))
    wall = time.perf_counter() - started
    merge = re.search(r"merged \d+ shards into .* in ([0-9.]+) s", done.stderr)
    run = re.search(r"^(\S+): .* in ([0-9.]+) s$", done.stdout, re.MULTILINE)
    complete = json.loads((Path(run.group(1)) / "complete.json").read_text())
    return {"wall_s": wall, "run_s": float(run.group(2)), "merge_s": float(merge.group(1)) if merge else None,
            "sha256": complete["sha256"], "summary": complete["summary"]}


def processes(model: str, limit: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """1 process (1 and 2 threads) vs 2 processes, interleaved; each run into a fresh directory."""
    variants = ("1 process, 1 thread", "1 process, 2 threads", "2 processes, 1 thread each")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for variant in variants:
                out = Path(tmp) / f"{repeat}-{variants.index(variant)}"
                runs[variant].append(_cli(model, limit, batch_size, out, variant))
                print(f"{variant}: {runs[variant][-1]['wall_s']:.1f} s", flush=True)
    digests = {json.dumps(run["sha256"], sort_keys=True) for values in runs.values() for run in values}
    median = {v: {key: statistics.median(r[key] for r in values) for key in ("wall_s", "run_s")} for v, values in runs.items()}
    merge = statistics.median(r["merge_s"] for r in runs[variants[2]])
    base = median[variants[0]]
    return {
        "model": model, "limit": limit, "batch_size": batch_size, "repeats": repeats,
        "median_s": median, "merge_s": merge,
        "runs_wall_s": {v: [round(r["wall_s"], 2) for r in values] for v, values in runs.items()},
        "speedup_vs_1_process_1_thread": {v: {k: base[k] / m[k] for k in m} for v, m in median.items()},
        "speedup_2_processes_vs_1_process_2_threads": {k: median[variants[1]][k] / median[variants[2]][k] for k in base},
        "merge_share_of_2_process_run": merge / median[variants[2]]["run_s"],
        "stores_identical": len(digests) == 1,
    }


CLAIM = ("batching speeds extraction up; full extraction costs about one plain generate at every batch size; "
         "2 processes on 2 cores beat 1, with a small merge")


def with_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios, flat, for the book's status page (``claim`` + ``ratios``)."""
    ratios: dict[str, float] = {}
    for label, runs in result.get("batch_scaling", {}).items():
        for run in runs:
            ratios[f"{label} batch {run['batch_size']}: speed vs batch 1"] = round(run["speed_vs_batch_1"], 3)
            ratios[f"{label} batch {run['batch_size']}: extraction over generate"] = round(run["extraction_over_generate"], 3)
    if "processes" in result:
        speedups = result["processes"]["speedup_vs_1_process_1_thread"]
        for variant, values in speedups.items():
            if variant != "1 process, 1 thread":
                ratios[f"{variant}: speed-up vs 1 process, 1 thread (wall)"] = round(values["wall_s"], 3)
        ratios["2 processes vs 1 process, 2 threads (wall)"] = round(result["processes"]["speedup_2_processes_vs_1_process_2_threads"]["wall_s"], 3)
        ratios["merge share of the 2-process run"] = round(result["processes"]["merge_share_of_2_process_run"], 4)
    result["environment"]["threads"] = result["settings"]["threads_per_process"]
    return {"claim": CLAIM, "ratios": ratios, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="examples per batch-scaling pass")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=int, default=160, help="examples of the process comparison")
    parser.add_argument("--process-repeats", type=int, default=2)
    parser.add_argument("--skip", choices=("batch", "processes"), action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise", type=Path, help="add the headline ratios to an earlier results file")
    parser.add_argument("--batch-child", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_child:
        print(json.dumps(batch_child(args.batch_child, args.batch_size, args.n, args.max_new_tokens, args.repeats)))
        return 0
    if args.summarise:
        result = with_ratios(json.loads(args.summarise.read_text()))
        args.summarise.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    import torch
    import transformers

    result: dict[str, Any] = {
        "environment": {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "note": "shared machine: other jobs ran beside this one; compare ratios within this run"},
        "settings": {"n": args.n, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads_per_process": 1},
    }
    if args.skip and args.out.is_file():  # keep the earlier run's numbers of the part skipped now
        earlier = json.loads(args.out.read_text())
        result.update({part: earlier[part] for part in ("batch_scaling", "processes") if part in earlier})
    with tempfile.TemporaryDirectory() as tmp:
        paper = str(build_model(Path(tmp) / "llava-1.5-shapes", hidden=256, layers=4, heads=8, seed=0))
        if "batch" not in args.skip:
            result["batch_scaling"] = batch_scaling({"zoo-llava": "zoo-llava", "llava-1.5-shapes": paper},
                                                    args.n, args.max_new_tokens, args.repeats)
            result["batch_scaling_load_average"] = os.getloadavg()
        if "processes" not in args.skip:
            result["processes"] = processes(paper, args.limit, 16, args.process_repeats)
            result["processes"]["model"] = "llava-1.5-shapes"
            result["processes_load_average"] = os.getloadavg()
    result["environment"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_ratios(result), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
