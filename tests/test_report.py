"""The study report on a tiny synthetic study folder (no model, no training)."""

from __future__ import annotations

import csv
import html
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE_REFS

from oloraplus.config import build_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.report import write_report
from oloraplus.runs import RunFolder
from oloraplus.stats import holm, paired_bootstrap, paired_bootstrap_bleu, paired_bootstrap_ratio, seed_level

REFS = SAMPLE_REFS
INDICES = [3, 11, 17, 24, 30, 41, 52, 60]  # record indices of the test split, shared by all runs
RESAMPLES = 200


def _base_config() -> dict:
    cfg = build_config(
        {
            "model": {"name": "tiny-test-model"},
            "data": {"source": "synthetic.json", "n_train": 40, "n_test": 8},
            "adapter": {"rank": 4, "alpha": 8},
            "train": {"lr": 2e-4, "logging_steps": 2, "dynamics_every": 2},
        }
    )
    return cfg.to_dict()


def _predictions(quality: str, loss: float) -> list[dict]:
    from oloraplus.scoring import bleu_statistics, rouge_per_example

    if quality == "good":
        preds = [r.replace("the", "a", 1) for r in REFS]
    else:
        preds = [" ".join(r.split()[:3]) + " something else entirely" for r in REFS]
    rouge = rouge_per_example(preds, REFS)
    bleu = bleu_statistics(preds, REFS)
    rows = []
    for k, (idx, ref, pred) in enumerate(zip(INDICES, REFS, preds)):
        per_loss = loss + 0.05 * ((k * 7) % 5 - 2)  # spread, but the same pattern for every run
        rows.append(
            {
                "index": idx,
                "instruction": f"Say sentence {idx}.",
                "input": "",
                "reference": ref,
                "prediction": pred,
                "loss": per_loss,
                "loss_sum": per_loss * 10,
                "n_tokens": 10,
                **rouge[k],
                "bleu_stats": bleu[k],
            }
        )
    return rows


def _write_run(
    study: Path,
    base: dict,
    method: str,
    lr_ratio: float,
    seed: int,
    status: str | None,
    quality: str = "bad",
    loss: float = 2.0,
    lr: float | None = None,
) -> Path:
    """One run folder; status None = unfinished (no metrics.json)."""
    lr = lr or base["train"]["lr"]
    run = RunFolder.in_study(study, f"{method}_lam{lr_ratio:g}_lr{lr:g}_seed{seed}")
    run.path.mkdir(parents=True)
    cfg = json.loads(json.dumps(base))
    cfg["adapter"].update(method=method, lr_ratio=lr_ratio)
    cfg["train"].update(seed=seed, lr=lr)
    cfg["output_dir"] = str(run.path)
    run.config.write_text(yaml.safe_dump(cfg))
    steps = list(range(2, 11, 2))
    history = [
        {"loss": loss + 1.5 - 0.2 * i, "grad_norm": 1.0, "learning_rate": lr, "epoch": s / 10, "step": s}
        for i, s in enumerate(steps)
    ]
    if status == "diverged":
        history[-1]["loss"] = float("nan")
    history.append({"train_runtime": 12.0, "step": steps[-1]})
    run.history.write_text(json.dumps(history))
    run.dynamics.write_text(
        "".join(
            json.dumps({"step": s, "dA": 0.01 * s, "dB": 0.02 * s * lr_ratio, "drift": None if s == 2 else 0.001 * s})
            + "\n"
            for s in steps
        )
    )
    if status is None:
        return run.path
    metrics = {
        "method": method,
        "init": "olora",
        "lr_ratio": lr_ratio,
        "lr": lr,
        "seed": seed,
        "status": status,
        "n_train": 40,
        "n_val": 0,
        "n_test": 8,
        "train_steps": 10,
        "train_seconds": 12.0 + seed,
        "train_tokens": 4000,
        "train_tokens_per_s": 4000 / (12.0 + seed),
        "precision": "fp32",
        "final_train_loss": history[-2]["loss"],
    }
    if status == "diverged":
        metrics["diverged_step"] = 40
    else:
        rows = _predictions(quality, loss)
        from oloraplus.scoring import bleu_from_statistics

        metrics.update(
            eval_loss=sum(r["loss"] for r in rows) / len(rows),
            bleu=bleu_from_statistics([r["bleu_stats"] for r in rows]),
            **{k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")},
            eval_loss_seconds=1.0,
            generation_seconds=2.0,
            generated_tokens=80,
            generation_tokens_per_s=40.0,
        )
        run.predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.metrics.write_text(json.dumps(metrics))
    return run.path


def _make_study(root: Path) -> Path:
    """olora (2 seeds), olora+ λ=0.25 (seed 0 good, seed 1 diverged), olora+ λ=4 (seed 0, seed 1 unfinished)."""
    base = _base_config()
    root.mkdir(parents=True)
    grid = {"methods": ["olora", "olora+"], "lr_ratios": [0.25, 4.0], "seeds": [0, 1], "lrs": None, "baseline": "olora"}
    (root / "study.yaml").write_text(yaml.safe_dump({"base": base, "grid": grid}, sort_keys=False))
    _write_run(root, base, "olora", 1.0, 0, "finished", "bad", 2.0)
    _write_run(root, base, "olora", 1.0, 1, "finished", "bad", 2.05)
    _write_run(root, base, "olora+", 0.25, 0, "finished", "good", 1.5)
    _write_run(root, base, "olora+", 0.25, 1, "diverged")
    run = _write_run(root, base, "olora+", 4.0, 0, "finished", "bad", 2.0)
    _write_run(root, base, "olora+", 4.0, 1, None)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["val_loss"] = float("nan")  # metrics.json may hold NaN
    (run / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One study and its report, shared by the read-only tests (matplotlib is the slow part)."""
    root = _make_study(tmp_path_factory.mktemp("report") / "study")
    return root, write_report(root, n_resamples=RESAMPLES)


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    return _make_study(tmp_path / "study")


def test_report_writes_every_output(built):
    study, paths = built
    assert paths[0] == study / "report.md"
    for name in ("report.md", "report.html", "results.csv", "results.json"):
        assert (study / name) in paths and (study / name).is_file()
    pngs = [p for p in paths if p.suffix == ".png"]
    assert {p.name for p in pngs} == {
        "train_loss_lr0.0002.png",
        "metrics_vs_lambda_lr0.0002.png",
        "dynamics_lr0.0002.png",
    }
    assert all(p.parent == study / "plots" and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert not list((study / "plots").glob(".*tmp*"))  # no temp files left behind


def test_html_is_self_contained(built):
    study = built[0]
    page = (study / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert 'src="plots/' not in page and "<style>" in page


def test_csv_and_json_list_finished_and_diverged_runs(built):
    study = built[0]
    with open(study / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5  # 4 finished + 1 diverged; the unfinished run has no row
    by_status = {r["run_id"]: r["status"] for r in rows}
    assert by_status["olora+_lam0.25_lr0.0002_seed1"] == "diverged"
    diverged = next(r for r in rows if r["status"] == "diverged")
    assert diverged["diverged_step"] == "40" and diverged["eval_loss"] == ""
    data = json.loads((study / "results.json").read_text())  # strict JSON: no NaN tokens
    assert data["counts"] == {"finished": 4, "diverged": 1, "unfinished": 1, "expected": 6}
    assert data["unfinished"] == ["olora+_lam4_lr0.0002_seed1"]
    assert len(data["runs"]) == 5 and len(data["table"]) == 3
    olora = next(t for t in data["table"] if t["method"] == "olora")
    assert olora["eval_loss"]["n"] == 2 and olora["eval_loss"]["mean"] == pytest.approx(2.025)
    comps = {(c["method"], c["lr_ratio"]): c for c in data["comparisons"]}
    assert set(comps) == {("olora+", 0.25), ("olora+", 4.0)}
    low_lambda = comps[("olora+", 0.25)]
    assert low_lambda["seeds"] == [0] and low_lambda["baseline_seeds"] == [0]  # paired on the shared seed
    assert low_lambda["metrics"]["eval_loss"]["diff"] == pytest.approx(-0.5)
    assert low_lambda["metrics"]["eval_loss"]["verdict"] == "better"
    assert low_lambda["metrics"]["bleu"]["verdict"] == "better"
    assert comps[("olora+", 4.0)]["metrics"]["rouge1"]["verdict"] == "not distinguishable"  # same answers as olora


def test_markdown_shows_verdicts_divergence_and_missing_runs(built):
    study = built[0]
    md = (study / "report.md").read_text()
    assert "## Against the baseline (olora, same learning rate)" in md
    verdicts = next(line for line in md.splitlines() if line.startswith("| fixed | olora+ | 1/4 |"))
    assert "better**" in verdicts  # the bold verdict is the lower eval loss of λ=1/4 (good answers, loss 1.5)
    assert "not distinguishable" in next(line for line in md.splitlines() if line.startswith("| fixed | olora+ | 4 |"))
    assert "1 of 2 diverged at step 40" in md
    assert "1 run(s) have no results yet" in md and "olora+_lam4_lr0.0002_seed1" in md
    assert "tiny-test-model" in md and "synthetic.json" in md and "n_test 8" in md
    assert "never used to choose anything" in md
    assert "(n=1)" in md  # a group with one finished seed has no interval
    assert "](plots/metrics_vs_lambda_lr0.0002.png)" in md
    assert "## Example predictions" in md and "the cat sat on the mat" in md


def test_group_where_every_run_diverged_shows_diverged(study: Path):
    base = _base_config()
    _write_run(study, base, "lora", 1.0, 0, "diverged")
    md = (write_report(study, n_resamples=RESAMPLES)[0]).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert row.count("diverged") >= 5 and "1 of 1 diverged at step 40" in row


def test_not_started_runs_are_counted(study: Path):
    import shutil

    shutil.rmtree(study / "runs" / "olora+_lam4_lr0.0002_seed1")
    shutil.rmtree(study / "runs" / "olora+_lam4_lr0.0002_seed0")
    write_report(study, n_resamples=RESAMPLES)
    data = json.loads((study / "results.json").read_text())
    assert sorted(data["unfinished"]) == ["olora+_lam4_lr0.0002_seed0", "olora+_lam4_lr0.0002_seed1"]
    assert "2 run(s) have no results yet" in (study / "report.md").read_text()


def test_second_learning_rate_without_baseline_gets_its_own_plots_and_a_note(study: Path):
    _write_run(study, _base_config(), "olora+", 4.0, 0, "finished", "good", 1.8, lr=1e-3)
    paths = write_report(study, n_resamples=RESAMPLES)
    names = {p.name for p in paths if p.suffix == ".png"}
    assert {"train_loss_lr0.001.png", "train_loss_lr0.0002.png", "metrics_vs_lambda_lr0.001.png"} <= names
    md = paths[0].read_text()
    assert "No finished olora run at lr 0.001" in md
    data = json.loads((study / "results.json").read_text())
    assert all(c["lr"] == 0.0002 for c in data["comparisons"])


def test_user_errors_name_the_path(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(OLoRAPlusError, match="nope"):
        write_report(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OLoRAPlusError, match=r"study\.yaml"):
        write_report(empty)
    (empty / "study.yaml").write_text(yaml.safe_dump({"base": _base_config(), "grid": {"methods": ["olora"]}}))
    (empty / "runs" / "olora_lam1_lr0.0002_seed0").mkdir(parents=True)
    with pytest.raises(OLoRAPlusError, match="no finished runs"):
        write_report(empty)
    # the grid is read by the study's own code: what it would refuse to run, the report refuses to read
    (empty / "study.yaml").write_text(
        yaml.safe_dump({"base": _base_config(), "grid": {"methods": ["olora"], "lambdas": [4]}})
    )
    with pytest.raises(OLoRAPlusError, match=r"study\.yaml.*unknown grid option.*lambdas"):
        write_report(empty)


def test_nan_in_metrics_json_becomes_null_in_results_json(built):
    study = built[0]
    assert "NaN" in (study / "runs" / "olora+_lam4_lr0.0002_seed0" / "metrics.json").read_text()
    text = (study / "results.json").read_text()
    assert "NaN" not in text
    run = next(r for r in json.loads(text)["runs"] if r["run_id"] == "olora+_lam4_lr0.0002_seed0")
    assert run["val_loss"] is None


def test_holm_adjusts_each_metric_over_the_rows_of_one_table(built):
    study = built[0]
    comps = json.loads((study / "results.json").read_text())["comparisons"]
    assert len(comps) == 2  # λ = 1/4 and λ = 4 against olora: one family
    for key in ("eval_loss", "bleu", "rouge1"):
        raw = [c["metrics"][key]["p_value"] for c in comps]
        assert [c["metrics"][key]["p_holm"] for c in comps] == pytest.approx(holm(raw))
    low = next(c for c in comps if c["lr_ratio"] == 0.25)
    assert low["verdicts"]["eval_loss"] == {"level": "examples", "raw": "better", "holm": "better"}
    assert low["seed_level"]["eval_loss"]["diffs"] == pytest.approx([-0.5])  # one paired seed
    md = (study / "report.md").read_text()
    assert "one seed: no seed-level interval" in md and "examples: Holm p" in md


def test_three_seeds_rest_the_verdict_on_the_seed_level(tmp_path: Path):
    """Seeds that disagree (-0.5, +0.3, +0.1): the example level is sure of the pooled gap, the seed level is not,
    and with 3 paired seeds the verdict is the seed level's."""
    base = _base_config()
    root = tmp_path / "study"
    root.mkdir()
    grid = {"methods": ["olora", "olora+"], "lr_ratios": [4.0], "seeds": [0, 1, 2]}
    (root / "study.yaml").write_text(yaml.safe_dump({"base": base, "grid": grid}, sort_keys=False))
    for seed, gap in enumerate((-0.5, 0.3, 0.1)):
        _write_run(root, base, "olora", 1.0, seed, "finished", "bad", 2.0)
        _write_run(root, base, "olora+", 4.0, seed, "finished", "bad", 2.0 + gap)
    write_report(root, n_resamples=RESAMPLES)
    c = json.loads((root / "results.json").read_text())["comparisons"][0]
    examples, seeds = c["metrics"]["eval_loss"], c["seed_level"]["eval_loss"]
    assert examples["verdict"] == "better" and examples["high"] < 0  # every example moved by the same -0.033
    assert seeds["diffs"] == pytest.approx([-0.5, 0.3, 0.1]) and seeds["low"] < 0 < seeds["high"]
    assert c["verdict_level"] == "seeds"
    assert c["verdicts"]["eval_loss"] == {"level": "seeds", "raw": "not distinguishable", "holm": "not distinguishable"}
    md = (root / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| fixed | olora+ | 4 |"))
    assert "seed level" in row and "-0.0333 [" in row and "better" not in row
    assert "fewer than 3 paired seeds" not in md


def test_unpaired_seeds_have_no_seed_level(tmp_path: Path):
    base = _base_config()
    root = tmp_path / "study"
    root.mkdir()
    grid = {"methods": ["olora", "olora+"], "lr_ratios": [4.0], "seeds": [0, 1]}
    (root / "study.yaml").write_text(yaml.safe_dump({"base": base, "grid": grid}, sort_keys=False))
    _write_run(root, base, "olora", 1.0, 0, "finished", "bad", 2.0)
    _write_run(root, base, "olora+", 4.0, 1, "finished", "good", 1.5)
    write_report(root, n_resamples=RESAMPLES)
    c = json.loads((root / "results.json").read_text())["comparisons"][0]
    assert not c["paired_by_seed"] and c["pairs"] == [] and c["seed_level"]["eval_loss"] is None
    assert c["metrics"]["eval_loss"]["seed_diffs"] == [] and c["verdict_level"] == "examples"
    assert "seeds not paired: no seed-level interval" in (root / "report.md").read_text()


def test_pairs_that_differ_in_machine_precision_or_settings_are_listed(study: Path):
    runs = study / "runs"

    def edit(run_id: str, metrics: dict | None = None, config=None) -> None:
        folder = RunFolder(runs / run_id)
        if metrics:
            folder.metrics.write_text(json.dumps({**json.loads(folder.metrics.read_text()), **metrics}))
        if config:
            cfg = yaml.safe_load(folder.config.read_text())
            config(cfg)
            folder.config.write_text(yaml.safe_dump(cfg))

    edit("olora_lam1_lr0.0002_seed0", {"device": "NVIDIA H200"})
    # trained in bf16, evaluated in fp32 as its baseline (whose metrics predate eval_precision: evaluated in its fp32)
    edit(
        "olora+_lam0.25_lr0.0002_seed0",
        {"device": "cpu", "precision": "bf16", "eval_precision": "fp32"},
        lambda c: c["train"].pop("packing"),
    )
    # 333 vs 50 tokens/s: ×6.7; and bf16 recorded as runs from before eval_precision did (evaluated in bf16)
    edit("olora+_lam4_lr0.0002_seed0", {"device": None, "train_tokens_per_s": 50.0, "precision": "bf16"})
    edit("olora_lam1_lr0.0002_seed0", config=lambda c: c["adapter"].update(dropout=0.1))
    write_report(study, n_resamples=RESAMPLES)
    comps = {c["lr_ratio"]: c for c in json.loads((study / "results.json").read_text())["comparisons"]}
    fields = {d["field"]: d for d in comps[0.25]["pairs"][0]["differences"]}
    assert set(fields) == {"device", "precision", "train.packing", "adapter.dropout"}
    assert (fields["device"]["run"], fields["device"]["baseline"]) == ("cpu", "NVIDIA H200")
    assert fields["train.packing"]["run"] is None and fields["train.packing"]["baseline"] is True
    far = {d["field"]: d for d in comps[4.0]["pairs"][0]["differences"]}
    assert set(far) == {"device", "adapter.dropout", "precision", "eval_precision"}
    assert far["device"]["throughputs"] == pytest.approx([50.0, 4000 / 12])
    md = (study / "report.md").read_text()
    assert "## Are the paired runs alike?" in md and "0 of 2 pair(s) alike" in md
    assert "device: cpu vs NVIDIA H200" in md and "precision: bf16 vs fp32" in md
    assert "train.packing: not recorded vs true" in md and "adapter.dropout: 0 vs 0.1" in md
    assert "50 vs 333 tokens/s (×7 apart): different machine kinds" in md
    assert "1 vs 1, 1 pair(s) not alike" in md
    assert "precision bf16 (evaluated in fp32)" in md  # the first run's, as the header names it


def test_pairs_that_differ_only_in_the_compared_settings_are_alike(built):
    comps = json.loads((built[0] / "results.json").read_text())["comparisons"]
    assert all(p["differences"] == [] for c in comps for p in c["pairs"])  # method, λ, seed and folder differ
    assert "2 of 2 pair(s) alike" in (built[0] / "report.md").read_text()


# --- the records' own texts ------------------------------------------------------------------------------------------


def _study_with_data_file(root: Path, n_records: int = 64) -> tuple[Path, Path, list[int]]:
    """The usual study, its runs scoring the records of a real data file's test split, their rows without texts."""
    from oloraplus.records import split_indices

    data = root / "alpaca.json"
    root.mkdir(parents=True)
    records = [{"instruction": f"Instruction of record {i}.", "input": "", "output": f"Answer {i}."} for i in range(64)]
    data.write_text(json.dumps(records[:n_records]))
    test = split_indices(64, 40, 8, 0.0, 42).test
    study = _make_study(root / "study")
    spec = yaml.safe_load((study / "study.yaml").read_text())
    spec["base"]["data"]["source"] = str(data)
    (study / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    to_test = dict(zip(INDICES, test))
    for path in study.glob("runs/*/predictions.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        stripped = [{**{k: v for k, v in r.items() if k not in ("instruction", "input", "reference")}} for r in rows]
        path.write_text("".join(json.dumps({**r, "index": to_test[r["index"]]}) + "\n" for r in stripped))
    return study, data, test


def test_examples_quote_the_data_file_by_record_index_and_nothing_without_it(tmp_path: Path):
    study, data, test = _study_with_data_file(tmp_path / "a")
    md = write_report(study, n_resamples=RESAMPLES)[0].read_text()
    shown = [int(i) for i in re.findall(r"^### Test example (\d+)$", md, flags=re.M)]
    assert shown and set(shown) <= set(test)
    for idx in shown:
        assert f"> Instruction of record {idx}." in md and f"> Answer {idx}." in md
    assert f"quoted from {data}" in md
    md = write_report(study, n_resamples=RESAMPLES, record_texts_from_data=False)[0].read_text()
    assert "Instruction of record" not in md and "Answer " not in md and "**Instruction:**" not in md
    assert "the report quotes nothing from the data" in md and len(re.findall(r"^### Test example", md, re.M)) == 3
    data.unlink()
    md = write_report(study, n_resamples=RESAMPLES)[0].read_text()
    assert "Instruction of record" not in md and f"the data file {data} is not here" in md


def test_a_data_file_that_is_not_the_runs_file_is_refused_or_left_out(tmp_path: Path):
    study, data, _ = _study_with_data_file(tmp_path / "b", n_records=20)  # too few records for the runs' split
    md = write_report(study, n_resamples=RESAMPLES)[0].read_text()
    assert "Instruction of record" not in md and "is not the runs' data file" in md
    before = (study / "report.md").read_text()
    from oloraplus.cli import main

    assert main(["report", str(study), "--data", str(data)]) == 2  # named on purpose: an error, nothing written
    assert main(["report", str(study), "--data", str(tmp_path / "nope.json")]) == 2
    assert (study / "report.md").read_text() == before


# --- pairing and token weighting ----------------------------------------------------------------------------------
#
# Runs whose predictions.jsonl rows come in a different order each, with a different number of answer tokens per
# example (and per run), one example missing from one run and one with no answer token left in another. Pairing by
# row order, or a table or difference weighted the wrong way, changes the numbers below.

PAIR_LOSS = [0.6, 2.9, 1.4, 3.3, 0.9, 2.2, 1.7, 2.6]  # baseline loss per example: widely spread
PAIR_GAIN = [0.05, 0.6, -0.3, 0.45, 0.0, 0.35, -0.15, 0.25]  # baseline − olora+ per example: uneven


def _pair_rows(method: str, seed: int) -> list[dict]:
    """One run's prediction rows, in a shuffled order, with per-example and per-run token counts."""
    from oloraplus.scoring import bleu_statistics, rouge_per_example

    plus = method == "olora+"
    preds = [
        f"{' '.join(ref.split()[: 3 + (k + seed + plus) % 5])} answer {idx}"
        for k, (idx, ref) in enumerate(zip(INDICES, REFS))
    ]
    rouge, bleu = rouge_per_example(preds, REFS), bleu_statistics(preds, REFS)
    rows = []
    for k, idx in enumerate(INDICES):
        loss = PAIR_LOSS[k] - (PAIR_GAIN[k] if plus else 0.0) + 0.03 * seed
        n = 4 + (7 * k + 5 * seed + 3 * plus) % 23  # answer tokens: differ by example and by run
        if plus and seed == 0 and idx == 3:  # truncation left no answer token: no loss, still scored by ROUGE/BLEU
            loss, n = None, 0
        rows.append(
            {
                "index": idx,
                "instruction": f"Say sentence {idx}.",
                "input": "",
                "reference": REFS[k],
                "prediction": preds[k],
                "loss": loss,
                "loss_sum": loss * n if n else None,
                "n_tokens": n,
                **rouge[k],
                "bleu_stats": bleu[k],
            }
        )
    if not plus and seed == 1:
        rows = [r for r in rows if r["index"] != 60]  # an example this run never scored
    random.Random(f"{method}{seed}").shuffle(rows)
    return rows


def _token_weighted(rows: list[dict]) -> float:
    return sum(r["loss_sum"] for r in rows if r["n_tokens"]) / sum(r["n_tokens"] for r in rows)


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, int], list[dict]]]:
    """olora and olora+ λ=4, seeds 0 and 1, with the rows above; the report written once."""
    from oloraplus.scoring import bleu_from_statistics

    root = tmp_path_factory.mktemp("paired") / "study"
    base = _base_config()
    grid = {"methods": ["olora", "olora+"], "lr_ratios": [4.0], "seeds": [0, 1]}
    root.mkdir(parents=True)
    (root / "study.yaml").write_text(yaml.safe_dump({"base": base, "grid": grid}, sort_keys=False))
    written = {}
    for method, lr_ratio in (("olora", 1.0), ("olora+", 4.0)):
        for seed in (0, 1):
            run = RunFolder(_write_run(root, base, method, lr_ratio, seed, "finished"))
            rows = written[(method, seed)] = _pair_rows(method, seed)
            metrics = json.loads(run.metrics.read_text())
            metrics.update(
                eval_loss=_token_weighted(rows),
                bleu=bleu_from_statistics([r["bleu_stats"] for r in rows]),
                **{k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")},
            )
            run.metrics.write_text(json.dumps(metrics))
            run.predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(root, n_resamples=RESAMPLES)
    return root, written


def _by_index(rows: list[dict]) -> dict[int, dict]:
    return {r["index"]: r for r in rows}


def _expected(written: dict, key: str, higher_is_better: bool):
    """The paired bootstrap on columns assembled by example index, over the examples every run has a value for;
    the loss as Σ loss_sum / Σ n_tokens of each run."""
    runs = {k: _by_index(rows) for k, rows in written.items()}
    shared = sorted(set.intersection(*({i for i, r in rows.items() if r[key] is not None} for rows in runs.values())))

    def cols(method: str, field: str) -> list[list]:
        return [[runs[(method, s)][i][field] for i in shared] for s in (0, 1)]

    if key == "loss":
        x, b = (cols(m, "loss_sum") for m in ("olora+", "olora"))
        xn, bn = (cols(m, "n_tokens") for m in ("olora+", "olora"))
        return shared, paired_bootstrap_ratio(x, xn, b, bn, False, RESAMPLES, 0)
    x, b = cols("olora+", key), cols("olora", key)
    if key == "bleu_stats":
        return shared, paired_bootstrap_bleu(x, b, RESAMPLES, 0)
    return shared, paired_bootstrap(x, b, higher_is_better, RESAMPLES, 0)


def test_comparison_pairs_examples_by_index_whatever_the_row_order(paired):
    root, written = paired
    assert [r["index"] for r in written[("olora", 0)]] != [r["index"] for r in written[("olora+", 0)]]  # shuffled
    comparison = json.loads((root / "results.json").read_text())["comparisons"][0]
    assert comparison["seeds"] == comparison["baseline_seeds"] == [0, 1] and comparison["paired_by_seed"]
    for key, example_key, higher in (
        ("eval_loss", "loss", False),
        ("bleu", "bleu_stats", True),
        ("rouge1", "rouge1", True),
        ("rougeL", "rougeL", True),
    ):
        shared, want = _expected(written, example_key, higher)
        got = comparison["metrics"][key]
        assert got["n_examples"] == len(shared), key
        assert (got["diff"], got["low"], got["high"]) == pytest.approx((want.diff, want.low, want.high), rel=1e-12), key
        assert got["verdict"] == want.verdict and got["p_value"] == pytest.approx(want.p_value, rel=1e-12)
        assert got["seed_diffs"] == pytest.approx(want.seed_diffs, rel=1e-12), key
    # index 60 (missing from one run) is in no comparison; index 3 (no answer token in one run) only has no loss
    assert comparison["metrics"]["eval_loss"]["n_examples"] == 6 and comparison["metrics"]["rouge1"]["n_examples"] == 7


def _weighted_on(rows: dict[int, dict], shared: list[int]) -> float:
    return sum(rows[i]["loss_sum"] for i in shared) / sum(rows[i]["n_tokens"] for i in shared)


def test_eval_loss_difference_is_token_weighted_per_run_not_a_mean_of_example_losses(paired):
    """Δ eval loss: each run's Σ loss_sum / Σ n_tokens on the shared examples, averaged over seeds, method − baseline;
    the report says so. A plain mean of per-example losses gives a different number on this fixture."""
    root, written = paired
    runs = {k: _by_index(rows) for k, rows in written.items()}
    shared = [11, 17, 24, 30, 41, 52]
    per_seed = [_weighted_on(runs[("olora+", s)], shared) - _weighted_on(runs[("olora", s)], shared) for s in (0, 1)]
    per_example = [
        sum(runs[("olora+", s)][i]["loss"] - runs[("olora", s)][i]["loss"] for s in (0, 1)) / 2 for i in shared
    ]
    comparison = json.loads((root / "results.json").read_text())["comparisons"][0]
    diff = comparison["metrics"]["eval_loss"]["diff"]
    assert abs(sum(per_seed) / 2 - sum(per_example) / len(shared)) > 0.01  # the two readings differ here
    assert diff == pytest.approx(sum(per_seed) / 2, rel=1e-12)
    assert comparison["seed_level"]["eval_loss"]["diffs"] == pytest.approx(per_seed, rel=1e-12)
    md = (root / "report.md").read_text()
    assert "The eval loss is token-weighted everywhere" in md and "response tokens (+ EOS)" in md


def test_seed_level_is_the_t_test_of_the_per_seed_differences(paired):
    root = paired[0]
    comparison = json.loads((root / "results.json").read_text())["comparisons"][0]
    for key, higher in (("eval_loss", False), ("rouge1", True), ("bleu", True)):
        per_seed = comparison["metrics"][key]["seed_diffs"]
        want = seed_level(per_seed, higher)
        got = comparison["seed_level"][key]
        assert len(per_seed) == 2 and got["diffs"] == pytest.approx(per_seed)
        assert (got["mean"], got["low"], got["high"], got["p_value"]) == pytest.approx(
            (want.mean, want.low, want.high, want.p_value), rel=1e-12
        )
        assert got["mean"] == pytest.approx(comparison["metrics"][key]["diff"], rel=1e-9)  # one estimate, two levels
    # two paired seeds: the verdicts rest on the example level, and the report says why
    assert comparison["verdict_level"] == "examples"
    assert all(v["level"] == "examples" for v in comparison["verdicts"].values())
    md = (root / "report.md").read_text()
    assert "1 of 1 row(s) have fewer than 3 paired seeds" in md
    assert "### Δ eval loss, both levels (protocol fixed)" in md


def test_table_eval_loss_is_the_token_weighted_loss_of_each_run(paired):
    """The table averages metrics.json's eval loss (token-weighted per run), not a plain mean of per-example losses."""
    root, written = paired
    table = {t["method"]: t for t in json.loads((root / "results.json").read_text())["table"]}
    for method in ("olora", "olora+"):
        weighted = [_token_weighted(written[(method, s)]) for s in (0, 1)]
        plain = [
            sum(r["loss"] for r in written[(method, s)] if r["loss"] is not None)
            / sum(r["loss"] is not None for r in written[(method, s)])
            for s in (0, 1)
        ]
        assert abs(sum(weighted) - sum(plain)) > 0.01  # the fixture tells the two apart
        assert table[method]["eval_loss"]["mean"] == pytest.approx(sum(weighted) / 2, rel=1e-12)


def test_example_answers_are_those_of_the_example_shown(paired):
    root = paired[0]
    md = (root / "report.md").read_text()
    shown = re.findall(r"^### Test example (\d+)$", md, flags=re.M)
    assert len(shown) == 3
    for part, idx in zip(md.split("### Test example ")[1:], shown):
        answers = [line for line in part.splitlines() if line.startswith("| olora")]
        assert len(answers) == 2 and all(line.endswith(f" answer {idx} |") for line in answers), part


# --- the package's shape --------------------------------------------------------------------------------------------


def test_markdown_and_html_say_the_same_words(paired):
    """Both are rendered from one document: every heading, paragraph, caption and cell appears in both."""
    from oloraplus.report.compare import group_runs
    from oloraplus.report.document import BulletList, Heading, Paragraph, Table, examples_section, head
    from oloraplus.report.load import load_study
    from oloraplus.report.texts import record_texts

    root = paired[0]
    md, page = (root / "report.md").read_text(), html.unescape((root / "report.html").read_text())
    study = load_study(root)
    blocks = [*head(study), *examples_section(group_runs(study), study.baseline, record_texts(study)).flat()]
    texts = [b.text for b in blocks if isinstance(b, (Heading, Paragraph))]
    texts += [item for b in blocks if isinstance(b, BulletList) for item in b.items]
    texts += [c.text for b in blocks if isinstance(b, Table) for row in b.rows for c in row if "\n" not in c.text]
    assert len(texts) > 20
    for text in texts:
        assert text in md and text in page, text
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert len(captions) == 3 and all(f"*{c}*" in md for c in captions)


def test_run_folder_knows_every_file_of_a_committed_run():
    """RunFolder names what the runs of a committed study hold (adapters are not committed)."""
    runs = Path(__file__).resolve().parents[1] / "docs" / "results" / "paper-cpu" / "runs"
    folder = RunFolder(sorted(p for p in runs.iterdir() if p.is_dir())[0])
    known = {
        p.name
        for p in (
            folder.config,
            folder.history,
            folder.dynamics,
            folder.train_loss_plot,
            folder.predictions,
            folder.metrics,
            folder.adapter,
        )
    }
    assert {p.name for p in folder.path.iterdir()} <= known
    assert folder.ended and folder.read_metrics()["status"] == "finished"


def test_importing_the_report_does_not_import_torch():
    code = "import sys, oloraplus.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
