"""Command line: ``python -m vrp_utils.data {build,baselines,sheet}``.

* ``build``: render the synthetic POPE-style benchmark (idempotent; says when nothing to do).
* ``baselines``: fit/score the shortcut baselines, print a markdown table, write results JSON.
* ``sheet``: save contact sheets (category shapes; first evaluation scenes) to eyeball them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vrp_utils.paths import BENCHMARK_DIR, RESULTS_DIR


def _build(args: argparse.Namespace) -> int:
    from vrp_utils.data.benchmark import build_benchmark_verbose

    result = build_benchmark_verbose(args.out, seed=args.seed, n_eval_images=args.n_eval_images,
                                     n_train_images=args.n_train_images, image_size=args.image_size,
                                     progress=not args.quiet, force=args.force)
    if result.rebuilt:
        print(f"built {result.out_dir} in {result.seconds:.1f}s: questions {result.counts}")
    else:
        print(f"{result.out_dir} is up to date (same parameters and files); nothing to do")
    return 0


def _baselines(args: argparse.Namespace) -> int:
    from vrp_utils.data.baselines import baseline_table, write_baselines

    if not (Path(args.root) / "manifest.json").is_file():
        print(f"no benchmark at {args.root}; run `python -m vrp_utils.data build` first", file=sys.stderr)
        return 2
    table = baseline_table(args.root, seed=args.seed)
    print(table.to_markdown(floatfmt=".3f"))
    path = write_baselines(table, args.out, root=args.root)
    print(f"\nwrote {path}")
    return 0


def _sheet(args: argparse.Namespace) -> int:
    from vrp_utils.data.benchmark import category_sheet, scene_sheet

    out = Path(args.out_dir)
    print(category_sheet(out / "categories.png", image_size=args.image_size))
    if (Path(args.root) / "manifest.json").is_file():
        print(scene_sheet(out / "scenes.png", args.root))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="render the synthetic POPE-style benchmark")
    b.add_argument("--out", type=Path, default=BENCHMARK_DIR, help=f"output directory (default {BENCHMARK_DIR})")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-eval-images", type=int, default=180)
    b.add_argument("--n-train-images", type=int, default=4000)
    b.add_argument("--image-size", type=int, default=64)
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    s = sub.add_parser("baselines", help="score shortcut baselines on each POPE setting")
    s.add_argument("--root", type=Path, default=BENCHMARK_DIR, help="benchmark directory")
    s.add_argument("--out", type=Path, default=RESULTS_DIR / "baselines.json")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_baselines)

    c = sub.add_parser("sheet", help="save contact sheets of categories and scenes")
    c.add_argument("--out-dir", type=Path, default=Path("/tmp/vrp_sheets"))
    c.add_argument("--root", type=Path, default=BENCHMARK_DIR)
    c.add_argument("--image-size", type=int, default=64)
    c.set_defaults(func=_sheet)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
