"""Every chapter runs on the paper checkpoints' geometry: image tokens and language-model depth (issue 24).

Claim: nothing in the chapters assumes the zoo's sizes. The three random-weight paper-geometry models
(``python -m vrp_utils.paper_geometry``: LLaVA-1.5's 576 image tokens and 32 layers, PaliGemma-224's 256
and 18, Qwen2-VL's per-image grid and 28; tiny width, random weights) are built into ``--out``, then every
chapter that takes a ``models`` parameter runs on each, one process at a time, at ``--limit`` questions per
setting. Their answers are random: this tests the code path, not the paper.

    .venv/bin/python benchmarks/paper_geometry_check.py              # all three families, every chapter
    .venv/bin/python benchmarks/paper_geometry_check.py --families llava --chapters 01_attention

Per chapter x family it records the wall seconds of ``python -m vrp_utils.run`` (model passes included:
the first chapter of each family extracts its store) and the peak resident memory of the largest process
of its tree (``wait4``'s ``ru_maxrss``: the runner, its kernel or a worker the kernel reaped; a maximum
over processes, not a sum), into ``benchmarks/results/paper_geometry_check.json``; it exits 1 if any chapter
failed, naming it and the executed copy with the traceback.

The paper models' feature stores and untrained twins go to ``<out>/data`` (``VRP_DATA_DIR``, emptied at the
start so every run measures the same work; its ``benchmark`` links to the project's), never to ``data/``.
The default limit, 36, is the smallest whole-image one at which chapter 03's probes are fitted: 6 images of
6 questions per setting (5 image-grouped folds need 6 images; at 24, 4 images, the chapter says it cannot fit
them and shows no probe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from vrp_utils.models.families import PAPER_LAYERS, SUPPORTED_MODEL_TYPES
from vrp_utils.paths import BENCHMARK_DIR, REPO_ROOT
from vrp_utils.results import write_json_atomic

RESULT = REPO_ROOT / "benchmarks" / "results" / "paper_geometry_check.json"
#: The chapters, in the book's order; those without a ``models`` parameter are reported as skipped.
CHAPTERS = ("00_benchmark_and_zoo", "01_attention", "02_masking", "03_probes", "04_self_consistency",
            "05_leaderboard")


def model_dir_name(family: str) -> str:
    return "paper-" + family.replace("_", "-")


def chapters_with_models(chapters: list[str]) -> tuple[list[str], list[str]]:
    """(chapters that take a ``models`` parameter, those that do not) in the given order."""
    from vrp_utils.run import notebook_parameters, read_notebook, resolve_notebook

    taking, not_taking = [], []
    for chapter in chapters:
        params = notebook_parameters(read_notebook(resolve_notebook(chapter)))
        (taking if "models" in params and "limit" in params else not_taking).append(chapter)
    return taking, not_taking


def build(family: str, out: Path, layers: int | None) -> dict:
    """Build (afresh) one paper-geometry model; its depth, parameters and the seconds it took."""
    from transformers import AutoConfig

    from vrp_utils.paper_geometry import save_paper_geometry_model

    path = out / model_dir_name(family)
    if path.exists():
        shutil.rmtree(path)
    started = time.perf_counter()
    save_paper_geometry_model(family, path, layers=layers)
    seconds = time.perf_counter() - started
    text = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"family": family, "dir": str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path),
            "layers": text.num_hidden_layers, "hidden": text.hidden_size, "heads": text.num_attention_heads,
            "weights_mib": round(size / 2**20, 2), "build_s": round(seconds, 1)}


def run_chapter(chapter: str, model: str, limit: int, pages: Path, logs: Path, env: dict) -> dict:
    """One ``python -m vrp_utils.run`` in its own process: wall seconds, peak RSS, exit status."""
    command = [sys.executable, "-m", "vrp_utils.run", chapter, "-p", "models", model, "-p", "limit", str(limit),
               "--output-dir", str(pages), "--no-progress"]
    log = logs / f"{chapter}.log"
    with open(log, "wb") as sink:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    row = {"chapter": chapter, "seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
           "rc": child.returncode, "log": str(log.relative_to(REPO_ROOT) if log.is_relative_to(REPO_ROOT) else log)}
    if child.returncode:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error:")]
        row["error"] = lines[-1] if lines else log.read_text(errors="replace")[-2000:]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(SUPPORTED_MODEL_TYPES), help="comma-separated, default all")
    parser.add_argument("--chapters", default=",".join(CHAPTERS), help="comma-separated, default every chapter")
    parser.add_argument("--limit", type=int, default=36, help="questions per setting (default 36: 6 images)")
    parser.add_argument("--layers", type=int, default=None, help="override the checkpoints' depth (a quick look)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "paper-geometry")
    parser.add_argument("--result", type=Path, default=RESULT, help="where the JSON goes")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(SUPPORTED_MODEL_TYPES))
    if unknown:
        parser.error(f"unknown families {unknown}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    chapters, skipped = chapters_with_models([c.strip() for c in args.chapters.split(",") if c.strip()])

    if not (BENCHMARK_DIR / "manifest.json").is_file():
        parser.error(f"no benchmark at {BENCHMARK_DIR}: build it first (make data), or point VRP_DATA_DIR at a data/ "
                     "directory that has one")
    out = args.out.resolve()
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)  # only our own stores and twins: the benchmark is a link to the project's
    data.mkdir(parents=True)
    (data / "benchmark").symlink_to(BENCHMARK_DIR.resolve(), target_is_directory=True)
    env = dict(os.environ, VRP_DATA_DIR=str(data), PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))

    started = time.time()
    record = {
        "command": "python benchmarks/paper_geometry_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "claim": __doc__.splitlines()[0],
        "limit": args.limit,
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "checkpoint_layers": PAPER_LAYERS,
        "skipped": {c: "takes no models parameter (it shows the benchmark and the released zoo)" for c in skipped},
        "models": [], "runs": [],
    }
    failures = []
    for family in families:
        model = build(family, out, args.layers)
        record["models"].append(model)
        print(f"{family}: built {model['dir']} ({model['layers']} layers, width {model['hidden']}) "
              f"in {model['build_s']} s", flush=True)
        pages, logs = out / "pages" / model_dir_name(family), out / "logs" / model_dir_name(family)
        logs.mkdir(parents=True, exist_ok=True)
        for chapter in chapters:
            row = {"family": family, **run_chapter(chapter, model["dir"], args.limit, pages, logs, env)}
            record["runs"].append(row)
            print(f"  {chapter:22s} {'ok' if not row['rc'] else 'FAILED'} {row['seconds']:7.1f} s "
                  f"{row['peak_rss_mib']:6d} MiB", flush=True)
            if row["rc"]:
                failures.append(row)
                print(f"    {row['error']}", flush=True)
            record["total_s"] = round(time.time() - started, 1)
            record["host"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            write_json_atomic(args.result, record)  # after each chapter: a stopped run keeps what it measured
    for chapter in skipped:
        print(f"skipped {chapter}: {record['skipped'][chapter]}")
    print(f"{len(record['runs']) - len(failures)} of {len(record['runs'])} chapter runs passed in "
          f"{record['total_s']} s -> {args.result}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
