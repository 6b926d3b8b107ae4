"""The seeds x kernel paths table (benchmarks/zoo_recipe.py): collected cards judged by the band, earlier runs kept."""

from __future__ import annotations


def _card(model: str, seed: int, random: float, cpu: str, kernel: str) -> dict:
    accuracy = {"random": random, "popular": random - 0.01, "adversarial": random - 0.05}
    return {"model": model, "seed": seed, "answer_steps": 900, "rotary_base": 1e4, "kernel": kernel, "cpu": cpu, "accuracy": accuracy,
            "build_seconds": 10.0, "card": {"metrics": {s: {"accuracy": a} for s, a in accuracy.items()}}}


def test_collected_runs_are_judged_and_replace_the_same_kept_run_only(benchmark_script):
    recipe = benchmark_script("zoo_recipe")
    best = {"random": 0.6, "popular": 0.55, "adversarial": 0.5}
    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC Processor"
    collected = [_card("zoo-qwen2-vl", 13, 0.95, epyc, "AVX512"), _card("zoo-llava", 12, 0.80, epyc, "DEFAULT")]
    kept = [
        {**_card("zoo-llava", 12, 0.70, epyc, "DEFAULT"), "in_band": True},   # the same run again: replaced
        {**_card("zoo-llava", 12, 0.71, xeon, "DEFAULT"), "in_band": True},   # another CPU: kept
        {**_card("zoo-llava", 11, 0.72, epyc, "DEFAULT"), "in_band": False},  # another seed: kept, verdict as recorded
        {**_card("zoo-qwen2-vl", 13, 0.63, epyc, "AVX512"), "rotary_base": 1e3, "in_band": False},  # another recipe: kept
    ]
    for row in kept:
        row.pop("card")
    rows = recipe.table_rows(collected, kept, best)
    assert [(r["model"], r["seed"], recipe.short_cpu(r["cpu"]), r["accuracy"]["random"], r["in_band"]) for r in rows] == [
        ("zoo-llava", 11, "AMD EPYC", 0.72, False),
        ("zoo-llava", 12, "AMD EPYC", 0.80, True),
        ("zoo-llava", 12, "Intel Xeon", 0.71, True),
        ("zoo-qwen2-vl", 13, "AMD EPYC", 0.63, False),  # the earlier recipe (rotary base 1e3) first
        ("zoo-qwen2-vl", 13, "AMD EPYC", 0.95, False),  # random 0.95 is above the band's 0.92
    ]
    assert any("outside" in p for p in rows[-1]["problems"]) and "card" not in rows[0]


def test_the_table_reads_each_family_s_rotary_base_from_its_saved_config(benchmark_script, tmp_path):
    import json

    from vrp_utils.models.families import zoo_config

    recipe = benchmark_script("zoo_recipe")
    for model_type, base in (("llava", 1e5), ("paligemma", 1e4), ("qwen2_vl", 1e3)):
        config = zoo_config(model_type, vocab_size=64, rope_theta=base)
        config.save_pretrained(tmp_path / model_type)  # the file a zoo model's card sits beside
        saved = json.loads((tmp_path / model_type / "config.json").read_text())
        assert recipe.rotary_base(saved) == base
        assert recipe.base_text(base) == f"1e{len(str(int(base))) - 1}"
    assert recipe.base_text(5e4) == "50000"
