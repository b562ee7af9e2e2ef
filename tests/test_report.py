"""The study report on a tiny synthetic study folder (no model, no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from oloraplus.config import build_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.report import write_report

from conftest import SAMPLE_REFS

REFS = SAMPLE_REFS
INDICES = [3, 11, 17, 24, 30, 41, 52, 60]  # record indices of the test split, shared by all runs
RESAMPLES = 200


def _base_config() -> dict:
    cfg = build_config(
        {"model": {"name": "tiny-test-model"}, "data": {"source": "synthetic.json", "n_train": 40, "n_test": 8},
         "adapter": {"rank": 4, "alpha": 8}, "train": {"lr": 2e-4, "logging_steps": 2, "dynamics_every": 2}}
    )
    return cfg.to_dict()


def _predictions(quality: str, loss: float) -> list[dict]:
    from oloraplus.evaluate import bleu_statistics, rouge_per_example

    if quality == "good":
        preds = [r.replace("the", "a", 1) for r in REFS]
    else:
        preds = [" ".join(r.split()[:3]) + " something else entirely" for r in REFS]
    rouge = rouge_per_example(preds, REFS)
    bleu = bleu_statistics(preds, REFS)
    rows = []
    for k, (idx, ref, pred) in enumerate(zip(INDICES, REFS, preds)):
        per_loss = loss + 0.05 * ((k * 7) % 5 - 2)  # spread, but the same pattern for every run
        rows.append({
            "index": idx, "instruction": f"Say sentence {idx}.", "input": "", "reference": ref, "prediction": pred,
            "loss": per_loss, "loss_sum": per_loss * 10, "n_tokens": 10, **rouge[k], "bleu_stats": bleu[k],
        })
    return rows


def _write_run(study: Path, base: dict, method: str, lam: float, seed: int, status: str | None,
               quality: str = "bad", loss: float = 2.0, lr: float | None = None) -> Path:
    """One run folder; status None = unfinished (no metrics.json)."""
    lr = lr or base["train"]["lr"]
    run = study / "runs" / f"{method}_lam{lam:g}_lr{lr:g}_seed{seed}"
    run.mkdir(parents=True)
    cfg = json.loads(json.dumps(base))
    cfg["adapter"].update(method=method, lr_ratio=lam)
    cfg["train"].update(seed=seed, lr=lr)
    cfg["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    steps = list(range(2, 11, 2))
    history = [{"loss": loss + 1.5 - 0.2 * i, "grad_norm": 1.0, "learning_rate": lr, "epoch": s / 10, "step": s}
               for i, s in enumerate(steps)]
    if status == "diverged":
        history[-1]["loss"] = float("nan")
    history.append({"train_runtime": 12.0, "step": steps[-1]})
    (run / "history.json").write_text(json.dumps(history))
    (run / "dynamics.jsonl").write_text("".join(
        json.dumps({"step": s, "dA": 0.01 * s, "dB": 0.02 * s * lam, "drift": None if s == 2 else 0.001 * s}) + "\n"
        for s in steps))
    if status is None:
        return run
    metrics = {
        "method": method, "init": "olora", "lr_ratio": lam, "lr": lr, "seed": seed, "status": status,
        "n_train": 40, "n_val": 0, "n_test": 8, "train_steps": 10, "train_seconds": 12.0 + seed,
        "train_tokens": 4000, "train_tokens_per_s": 4000 / (12.0 + seed), "precision": "fp32",
        "final_train_loss": history[-2]["loss"],
    }
    if status == "diverged":
        metrics["diverged_step"] = 40
    else:
        rows = _predictions(quality, loss)
        from oloraplus.evaluate import bleu_from_statistics

        metrics.update(
            eval_loss=sum(r["loss"] for r in rows) / len(rows), bleu=bleu_from_statistics([r["bleu_stats"] for r in rows]),
            **{k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")},
            eval_loss_seconds=1.0, generation_seconds=2.0, generated_tokens=80, generation_tokens_per_s=40.0,
        )
        (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


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
    assert {p.name for p in pngs} == {"train_loss_lr0.0002.png", "metrics_vs_lambda_lr0.0002.png", "dynamics_lr0.0002.png"}
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
    assert "better**" in md and "not distinguishable" in md
    assert "1 of 2 diverged at step 40" in md
    assert "1 run(s) have no results yet" in md and "olora+_lam4_lr0.0002_seed1" in md
    assert "tiny-test-model" in md and "synthetic.json" in md and "n_test 8" in md
    assert "never used to choose anything" in md
    assert "(n=1)" in md  # a group with one finished seed has no interval
    assert "![" in md and "plots/metrics_vs_lambda_lr0.0002.png" in md
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
    with pytest.raises(OLoRAPlusError, match="study.yaml"):
        write_report(empty)
    (empty / "study.yaml").write_text(yaml.safe_dump({"base": _base_config(), "grid": {"methods": ["olora"]}}))
    (empty / "runs" / "olora_lam1_lr0.0002_seed0").mkdir(parents=True)
    with pytest.raises(OLoRAPlusError, match="no finished runs"):
        write_report(empty)


def test_nan_in_metrics_json_becomes_null_in_results_json(built):
    study = built[0]
    assert "NaN" in (study / "runs" / "olora+_lam4_lr0.0002_seed0" / "metrics.json").read_text()
    text = (study / "results.json").read_text()
    assert "NaN" not in text
    run = next(r for r in json.loads(text)["runs"] if r["run_id"] == "olora+_lam4_lr0.0002_seed0")
    assert run["val_loss"] is None
