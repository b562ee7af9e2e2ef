"""Protocol tuned: lr chosen per method/lambda on validation data (never the test split), then tested over seeds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from oloraplus.cli import main
from oloraplus.config import EvalConfig, build_config
from oloraplus.data import split_indices
from oloraplus.errors import OLoRAPlusError
from oloraplus.grid import (
    SELECTION_FILE,
    build_grid,
    check_protocol,
    choose_lrs,
    final_specs,
    full_steps,
    probe_steps,
    selection_specs,
)
from oloraplus.report import write_report
from oloraplus.study import run_selection

N_TRAIN, N_TEST, VAL_FRACTION, SPLIT_SEED = 20, 4, 0.2, 42
LRS = (1e-4, 2e-2)
FIXED_LR = 1e-4
PROBE = 0.5  # 16 training records / batch 4 = 4 full steps -> probes of 2 steps
RESAMPLES = 200

RUN_OPTIONS = {
    "n_train": N_TRAIN,
    "n_test": N_TEST,
    "val_fraction": VAL_FRACTION,
    "split_seed": SPLIT_SEED,
    "batch_size": 4,
    "max_new_tokens": 4,
    "logging_steps": 1,
    "dynamics_every": 2,
}
GRID = {
    "methods": "olora,olora+",
    "lr_ratios": "4",
    "seeds": "0,1",
    "lrs": ",".join(f"{lr:g}" for lr in LRS),
    "protocol": "both",
    "fixed_lr": f"{FIXED_LR:g}",
    "probe_fraction": f"{PROBE:g}",
    "selection_seeds": "first",
}


def _compare_args(model_dir: Path, data: Path, study: Path, **changes: str) -> list[str]:
    options = {"model": str(model_dir), "data": str(data), **RUN_OPTIONS, **GRID, **changes}
    args = ["compare", "--study_dir", str(study), "--no_report"]
    for key, value in options.items():
        if value is not None:
            args += [f"--{key}", str(value)]
    return args


def _write_data(path: Path, poison_test: bool) -> Path:
    """60 real records; with poison_test, the records of the test split get garbage answers."""
    from conftest import _records

    records = [dict(r) for r in _records()[:60]]
    if poison_test:
        split = split_indices(len(records), N_TRAIN, N_TEST, VAL_FRACTION, SPLIT_SEED)
        for i in split.test:
            records[i]["output"] = "zq xv qq " * 40
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _selection_dirs(study: Path) -> list[Path]:
    return sorted(p for p in (study / "runs").iterdir() if p.name.endswith(f"_probe{PROBE:g}"))


def _final_dirs(study: Path) -> list[Path]:
    return sorted(p for p in (study / "runs").iterdir() if p.name.endswith(("_seed0", "_seed1")))


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A finished protocol-both study on the tiny model: (study folder, clean data file)."""
    root = tmp_path_factory.mktemp("tuned")
    data = _write_data(root / "clean.json", poison_test=False)
    study = root / "study"
    assert main(_compare_args(tiny_model_dir, data, study)) == 0
    return study, data


def test_selection_runs_never_read_the_test_split(tuned, tiny_model_dir, tmp_path):
    study, _ = tuned
    poisoned = _write_data(tmp_path / "poisoned.json", poison_test=True)
    base = build_config({}, {"model": str(tiny_model_dir), "data": str(poisoned), **RUN_OPTIONS})
    grid = build_grid({}, GRID)
    other = tmp_path / "poisoned-study"
    run_selection(other, base, grid, selection_specs(grid))

    clean = json.loads((study / SELECTION_FILE).read_text())
    dirty = json.loads((other / SELECTION_FILE).read_text())
    assert {k: e["chosen_lr"] for k, e in dirty.items()} == {k: e["chosen_lr"] for k, e in clean.items()}
    for key, entry in clean.items():
        assert dirty[key]["val_loss_by_lr"] == pytest.approx(entry["val_loss_by_lr"], rel=1e-6)
    for folder in _selection_dirs(study) + _selection_dirs(other):
        assert not (folder / "predictions.jsonl").exists()
        metrics = _metrics(folder)
        assert "eval_loss" not in metrics and math.isfinite(metrics["val_loss"])
        assert yaml.safe_load((folder / "config.yaml").read_text())["eval"]["test"] is False
    # the poison is real: exactly the test records differ between the two files
    clean_records = json.loads(tuned[1].read_text())
    dirty_records = json.loads(poisoned.read_text())
    changed = {i for i, (a, b) in enumerate(zip(clean_records, dirty_records)) if a != b}
    assert changed == set(split_indices(60, N_TRAIN, N_TEST, VAL_FRACTION, SPLIT_SEED).test)


def test_chosen_lr_is_the_argmin_of_validation_loss(tuned):
    study, _ = tuned
    selection = json.loads((study / SELECTION_FILE).read_text())
    assert set(selection) == {"olora/1", "olora+/4"}
    for key, entry in selection.items():
        method, lr_ratio = key.split("/")
        losses = {
            lr: _metrics(study / "runs" / f"{method}_lam{lr_ratio}_lr{lr:g}_seed0_probe{PROBE:g}")["val_loss"]
            for lr in LRS
        }
        assert entry["val_loss_by_lr"] == pytest.approx({f"{lr:g}": v for lr, v in losses.items()})
        assert entry["chosen_lr"] == min(losses, key=losses.get)
        assert entry["selection_seeds"] == [0] and entry["probe_fraction"] == PROBE


def test_probes_run_the_stated_number_of_steps_and_finals_the_full_length(tuned):
    study, _ = tuned
    base = build_config({}, {"data": "x.json", **RUN_OPTIONS})
    assert full_steps(base) == 4 and probe_steps(base, PROBE) == 2
    probes = _selection_dirs(study)
    assert len(probes) == 4  # 2 method/lambda x 2 lrs x the first seed
    assert all(_metrics(p)["train_steps"] == 2 for p in probes)
    finals = _final_dirs(study)
    assert all(_metrics(p)["train_steps"] == 4 and (p / "predictions.jsonl").is_file() for p in finals)


def test_final_runs_cover_both_protocols_over_all_seeds(tuned):
    study, _ = tuned
    selection = json.loads((study / SELECTION_FILE).read_text())
    names = {p.name for p in _final_dirs(study)}
    for method, lr_ratio in (("olora", "1"), ("olora+", "4")):
        chosen = selection[f"{method}/{lr_ratio}"]["chosen_lr"]
        for seed in (0, 1):
            assert f"{method}_lam{lr_ratio}_lr{FIXED_LR:g}_seed{seed}" in names  # protocol fixed
            assert f"{method}_lam{lr_ratio}_lr{chosen:g}_seed{seed}" in names  # protocol tuned (reused when equal)


def test_within_a_seed_the_tuned_runs_come_before_the_fixed_ones():
    grid = build_grid(GRID)
    chosen = {"olora": 2e-2, "olora+": 3e-3}  # olora+'s lr is in neither protocol's fixed runs
    selection = {
        f"{m}/{r:g}": {"method": m, "lr_ratio": r, "chosen_lr": chosen[m]} for m, r in (("olora", 1.0), ("olora+", 4.0))
    }
    specs = final_specs(build_config(), grid, selection)
    assert len(specs) == len(set(specs)) == 2 * 4  # per seed: 2 tuned + 2 fixed runs
    for seed in (0, 1):
        is_tuned = [s.lr == chosen[s.method] for s in specs if s.seed == seed]
        assert is_tuned == [True, True, False, False], specs  # every tuned run before any fixed one


def test_report_shows_heatmap_selection_and_both_verdict_tables(tuned, tmp_path):
    study = shutil.copytree(tuned[0], tmp_path / "study")
    paths = write_report(study, n_resamples=RESAMPLES)
    md = paths[0].read_text()
    assert study / "plots" / "val_loss_heatmap_olora.png" in paths
    assert "plots/val_loss_heatmap_olora.png" in md
    assert "## Learning-rate selection on validation data (protocol tuned)" in md
    assert "## Against the baseline (olora, same learning rate)" in md
    assert "## Against the baseline (olora, each at its tuned learning rate)" in md
    assert "| fixed | olora+ | 4 |" in md and "| tuned | olora+ | 4 |" in md
    assert "the test split was never used to choose anything" in md
    assert f"short probes of {PROBE:g} × the full length: 2 of 4 optimizer steps" in md
    data = json.loads((study / "results.json").read_text())
    assert {c["protocol"] for c in data["comparisons"]} == {"fixed", "tuned"}
    fixed = next(c for c in data["comparisons"] if c["protocol"] == "fixed")
    assert fixed["lr"] == FIXED_LR and fixed["baseline_lr"] == FIXED_LR  # only the fixed lr, not the tuned ones
    selection = json.loads((study / SELECTION_FILE).read_text())
    tuned_c = next(c for c in data["comparisons"] if c["protocol"] == "tuned")
    assert tuned_c["lr"] == selection["olora+/4"]["chosen_lr"]
    assert tuned_c["baseline_lr"] == selection["olora/1"]["chosen_lr"]  # the baseline at ITS chosen lr
    assert tuned_c["seeds"] == [0, 1] and tuned_c["paired_by_seed"]
    assert data["selection"] == selection and data["selection_runs"] == 4
    assert data["unfinished"] == []


def test_a_method_whose_every_lr_diverged_is_shown_without_a_verdict(tuned, tmp_path):
    study = shutil.copytree(tuned[0], tmp_path / "study")
    selection = json.loads((study / SELECTION_FILE).read_text())
    entry = selection["olora+/4"]
    entry["chosen_lr"], entry["val_loss_by_lr"] = None, {k: None for k in entry["val_loss_by_lr"]}
    (study / SELECTION_FILE).write_text(json.dumps(selection))
    paths = write_report(study, n_resamples=RESAMPLES)
    md = paths[0].read_text()
    assert "every lr diverged in selection: no tuned verdict" in md
    assert study / "plots" / "val_loss_heatmap_olora.png" in paths
    data = json.loads((study / "results.json").read_text())
    assert [c for c in data["comparisons"] if c["protocol"] == "tuned"] == []


def test_choose_lrs_counts_diverged_and_nan_runs_as_infinite():
    grid = build_grid(
        {
            "methods": ["olora", "olora+"],
            "lr_ratios": [4],
            "seeds": [0, 1],
            "lrs": [1e-4, 2e-4, 4e-4],
            "protocol": "tuned",
            "selection_seeds": "all",
        }
    )

    def m(val: float, status: str = "finished") -> dict:
        return {"status": status, "val_loss": val}

    runs = {
        # olora: 4e-4 is best on seed 0 but diverged on seed 1 -> +inf mean; 2e-4 wins
        "olora_lam1_lr0.0001_seed0_select": m(3.0),
        "olora_lam1_lr0.0001_seed1_select": m(3.2),
        "olora_lam1_lr0.0002_seed0_select": m(2.9),
        "olora_lam1_lr0.0002_seed1_select": m(2.9),
        "olora_lam1_lr0.0004_seed0_select": m(1.0),
        "olora_lam1_lr0.0004_seed1_select": {"status": "diverged"},
        # olora+ lambda 4: every lr diverged or non-finite
        "olora+_lam4_lr0.0001_seed0_select": m(float("nan"), "diverged"),
        "olora+_lam4_lr0.0001_seed1_select": m(2.0),
        "olora+_lam4_lr0.0002_seed0_select": {"status": "diverged"},
        "olora+_lam4_lr0.0002_seed1_select": m(2.0),
        "olora+_lam4_lr0.0004_seed0_select": m(float("inf")),
        "olora+_lam4_lr0.0004_seed1_select": m(2.0),
    }
    chosen = choose_lrs(grid, runs)
    assert chosen["olora/1"]["chosen_lr"] == 2e-4
    assert chosen["olora/1"]["val_loss_by_lr"] == {
        "0.0001": pytest.approx(3.1),
        "0.0002": pytest.approx(2.9),
        "0.0004": None,
    }
    assert chosen["olora+/4"]["chosen_lr"] is None
    assert chosen["olora/1"]["selection_seeds"] == [0, 1]
    with pytest.raises(OLoRAPlusError, match="without results"):
        choose_lrs(grid, {k: v for k, v in runs.items() if "seed1" not in k})


def test_preset_paper_cpu_tuned():
    from oloraplus.cli import load_preset

    data = load_preset("paper-cpu-tuned")
    grid = build_grid(data.pop("grid"))
    base = build_config(data)
    check_protocol(base, grid)
    assert (grid.protocol, grid.lrs, grid.probe_fraction, grid.selection_seeds, grid.seeds) == (
        "both",
        [1e-4, 2e-4, 4e-4],
        0.25,
        "first",
        [0, 1, 2],
    )
    assert base.data.val_fraction == 0.1 and base.train.lr == 2e-4
    # the study is run under the training defaults the lean-runs ablation chose, not a recipe of its own
    assert (
        base.adapter.dropout == 0
        and not base.train.group_by_length
        and base.eval.eval_batch_size == EvalConfig().eval_batch_size
    )


BAD = [
    (
        {"protocol": "tuned", "lrs": None},
        "protocol tuned chooses among learning rates: give lrs with at least 2 values",
    ),
    (
        {"protocol": "both", "lrs": "1e-4"},
        "protocol both chooses among learning rates: give lrs with at least 2 values",
    ),
    ({"val_fraction": "0"}, "protocol both chooses the lr on validation loss: set val_fraction > 0 (e.g. 0.1)"),
    ({"protocol": "best"}, "protocol must be one of fixed, tuned, both, got 'best'"),
    ({"probe_fraction": "0"}, "probe_fraction must be in (0, 1], got 0.0"),
    ({"probe_fraction": "1.5"}, "probe_fraction must be in (0, 1], got 1.5"),
    ({"selection_seeds": "some"}, "selection_seeds must be first or all, got 'some'"),
    ({"protocol": "fixed"}, "protocol fixed: give lrs (one fixed-lr comparison per lr) or fixed_lr, not both"),
    ({"fixed_lr": "-1"}, "fixed_lr must be a finite number > 0, got -1.0"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m for _, m in BAD])
def test_bad_protocol_configs_give_one_line_errors(changes, message, tiny_model_dir, small_data, tmp_path, capsys):
    study = tmp_path / "study"
    assert main(_compare_args(tiny_model_dir, small_data, study, **changes)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"oloraplus: error: {message}"
    assert not study.exists()


def test_a_killed_tuned_study_resumes_without_redoing_finished_runs(tuned, tiny_model_dir, capsys):
    """Last: it reruns runs of the shared study (deterministically, so the others' assertions still hold)."""
    study, data = tuned
    args = _compare_args(tiny_model_dir, data, study)
    before = {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.json")}
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(lr selection): 4 runs, 4 already finished, 0 to run" in out
    assert "already finished, 0 to run" in out.split("(test)")[1]
    assert {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.json")} == before

    # killed after one selection run and before the lrs were written; a final run also unfinished
    selection = json.loads((study / SELECTION_FILE).read_text())
    (study / SELECTION_FILE).unlink()
    probe, final = _selection_dirs(study)[0], _final_dirs(study)[-1]
    (probe / "metrics.json").unlink()
    (final / "metrics.json").unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(lr selection): 4 runs, 3 already finished, 1 to run" in out
    after = {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.json")}
    assert sorted(after) == sorted(before)
    assert {k for k in after if after[k] != before[k]} == {probe.name, final.name}
    again = json.loads((study / SELECTION_FILE).read_text())
    assert {k: e["chosen_lr"] for k, e in again.items()} == {k: e["chosen_lr"] for k, e in selection.items()}
    for key, entry in selection.items():
        assert again[key]["val_loss_by_lr"] == pytest.approx(entry["val_loss_by_lr"], rel=1e-6)
