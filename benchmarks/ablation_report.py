"""Compare the pipelines of benchmarks/ablation_order_dropout.sh, paired by seed, with the study's statistics.

For each pair of pipelines and each metric: the per-seed difference (B − A), their
mean with a 95% t interval over seeds (n − 1 degrees of freedom), and the paired
bootstrap over test examples pooled over seeds (stats.paired_bootstrap). Test loss is
token-weighted (summed response-token loss / response tokens), as the runs report it.

    python benchmarks/ablation_report.py docs/results/ablation-order-dropout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from oloraplus.stats import mean_ci, paired_bootstrap, paired_bootstrap_bleu  # noqa: E402

PIPELINES = (
    "grouped-dropout",
    "random-dropout",
    "random-nodropout",
    "random-nodropout-bf16",
    "random-nodropout-bf16train",
)
PAIRS = (
    ("grouped-dropout", "random-dropout"),
    ("random-dropout", "random-nodropout"),
    ("grouped-dropout", "random-nodropout"),
    ("random-nodropout", "random-nodropout-bf16"),
    ("random-nodropout", "random-nodropout-bf16train"),
)
ROUGE = ("rouge1", "rouge2", "rougeL")
# a pipeline that is another one's runs scored again: `oloraplus evaluate RUN --eval_precision fp32 --eval_dir
# RUN/evaluation-fp32` on each bf16 run (its folder, from the script, is read instead where it exists)
REEVALUATED = {"random-nodropout-bf16train": ("random-nodropout-bf16", "evaluation-fp32")}


def load(study: Path, scored_in: str = "") -> dict[int, dict]:
    """seed -> {metrics, predictions} of the finished runs of one pipeline's study folder.

    `scored_in`: each run's subfolder holding a later evaluation of it, whose scores replace the run's own.
    """
    runs = {}
    for metrics_file in sorted(study.glob("runs/*/metrics.json")):
        m = json.loads(metrics_file.read_text())
        scores = metrics_file.parent / scored_in
        if m.get("status") != "finished" or not (scores / "predictions.jsonl").is_file():
            continue
        if scored_in:
            m = {**m, **json.loads((scores / "metrics.json").read_text())}
        preds = [json.loads(line) for line in (scores / "predictions.jsonl").read_text().splitlines()]
        runs[int(m["seed"])] = {"metrics": m, "preds": sorted(preds, key=lambda p: p["index"])}
    return runs


def token_loss(preds: list[dict]) -> float:
    return sum(p["loss_sum"] for p in preds if p["n_tokens"]) / sum(p["n_tokens"] for p in preds)


def main(root: Path) -> None:
    studies = {name: load(root / name) for name in PIPELINES if (root / name).is_dir()}
    for name, (source, scored_in) in REEVALUATED.items():
        if name not in studies and (root / source).is_dir():
            studies[name] = load(root / source, scored_in)
    studies = {name: runs for name, runs in studies.items() if runs}
    print("finished seeds: " + ", ".join(f"{n} {sorted(s)}" for n, s in studies.items()))
    for name, runs in studies.items():
        for seed, r in sorted(runs.items()):
            m = r["metrics"]
            print(
                f"  {name:<17} seed {seed}: loss {token_loss(r['preds']):.4f}  BLEU {m['bleu']:.2f}  "
                f"ROUGE-1/2/L {m['rouge1'] * 100:.1f}/{m['rouge2'] * 100:.1f}/{m['rougeL'] * 100:.1f}  "
                f"train {m['train_seconds']:.0f} s at {m['train_tokens_per_s']:.1f} tok/s ({m.get('device', '?')})"
            )
    for a, b in PAIRS:
        seeds = sorted(set(studies.get(a, {})) & set(studies.get(b, {})))
        if not seeds:
            continue
        ra, rb = ([studies[x][s]["preds"] for s in seeds] for x in (a, b))
        print(f"\n{b} − {a}, seeds {seeds} (negative loss / positive BLEU, ROUGE = {b} better)")
        per_seed = {"test loss": [token_loss(y) - token_loss(x) for x, y in zip(ra, rb)]}
        per_seed["BLEU"] = [studies[b][s]["metrics"]["bleu"] - studies[a][s]["metrics"]["bleu"] for s in seeds]
        for k in ROUGE:
            per_seed[k] = [100 * (studies[b][s]["metrics"][k] - studies[a][s]["metrics"][k]) for s in seeds]
        # example level, pooled over seeds: per-example summed loss and token counts, so the mean stays token-weighted
        tokens = [[p["n_tokens"] for p in x] for x in ra]
        scale = len(ra[0]) / sum(tokens[0])
        boot = {
            "test loss": paired_bootstrap(
                [[p["loss_sum"] * scale for p in y] for y in rb],
                [[p["loss_sum"] * scale for p in x] for x in ra],
                higher_is_better=False,
            ),
            "BLEU": paired_bootstrap_bleu(
                [[p["bleu_stats"] for p in y] for y in rb], [[p["bleu_stats"] for p in x] for x in ra]
            ),
        }
        for k in ROUGE:
            boot[k] = paired_bootstrap(
                [[100 * p[k] for p in y] for y in rb], [[100 * p[k] for p in x] for x in ra], True
            )
        for metric, diffs in per_seed.items():
            ci = mean_ci(diffs)
            seed_level = f"{ci.mean:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]" if ci.n > 1 else f"{ci.mean:+.4f} (n=1)"
            bt = boot[metric]
            print(
                f"  {metric:<9} per seed {', '.join(f'{d:+.4f}' for d in diffs)} | seed level {seed_level} | "
                f"examples {bt.diff:+.4f} [{bt.low:+.4f}, {bt.high:+.4f}] {bt.verdict}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "results" / "ablation-order-dropout"))
