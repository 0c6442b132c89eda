"""`reproduce NAME` spread over machines (benchmarks/reproduce/sweep.py, docs/hpo.md): workers
with --search-only fill each cell's Optuna study on one storage, --status shows them, and a last
run without --search-only retrains each cell's best and writes the table. On SQLite here; on a
throwaway PostgreSQL server (the fixture of test_bench_hpo.py) with two worker processes, as the
walkthrough in docs/hpo.md does it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from benchmarks.cli import main
from benchmarks.demo_data import write_medmnist
from tests.test_bench_hpo import postgres_url  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]


def _args(data, out, *extra):
    return ["reproduce", "table2", "--out", str(out), "--datasets", "ham10000",
            "--dataset", f"ham10000=medmnist:{data}", "--model-as", "tiny-resnet", "--no-pretrained",
            "--methods", "linear", "--seeds", "0", "1", "--epochs", "1", "--image-size", "32",
            "--batch-size", "16", "--hpo-trials", "3", "--quiet", *extra]


def _trials(storage):
    [name] = optuna.get_all_study_names(storage)
    return name, optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_search_only_then_status_then_retrain_and_table_on_one_storage(tmp_path, capsys):
    data = write_medmnist(tmp_path / "ham.npz", sizes=(32, 8, 8))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(_args(data, tmp_path / "w1", "--storage", storage, "--search-only")) == 0
    assert not list((tmp_path / "w1").rglob("result.json"))  # a worker retrains nothing
    name, trials = _trials(storage)
    assert name == "ham10000__tiny-resnet__linear__f1" and len(trials) == 3
    capsys.readouterr()
    assert main(_args(data, tmp_path / "w1", "--storage", storage, "--status")) == 0
    status = capsys.readouterr().out
    assert f"{name}" in status and "3/3" in status and "3/3 trials finished over 1 cells" in status
    # a second worker finds the cell full: no new trials
    assert main(_args(data, tmp_path / "w2", "--storage", storage, "--search-only")) == 0
    assert len(_trials(storage)[1]) == 3
    out = tmp_path / "final"
    assert main(_args(data, out, "--storage", storage)) == 0
    assert len(_trials(storage)[1]) == 3  # the finishing run searched nothing more
    results = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    best_lr = optuna.load_study(study_name=name, storage=storage).best_params["lr"]
    assert sorted(r["config"]["seed"] for r in results) == [0, 1]
    assert {r["config"]["lr"] for r in results} == {best_lr}
    assert (out / "tables.md").is_file() and not (out / "hpo.db").exists()


@pytest.mark.slow  # two worker processes that import torch and train: a minute or two here
def test_two_workers_on_postgresql_then_the_table(postgres_url, tmp_path):  # noqa: F811
    data = write_medmnist(tmp_path / "ham.npz", sizes=(32, 8, 8))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "benchmarks", *_args(data, tmp_path / f"worker{i}"),
                                 "--storage", postgres_url, "--search-only", "--hpo-trials", "4"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in (1, 2)]
    for w in workers:
        log, _ = w.communicate(timeout=600)
        assert w.returncode == 0, log[-3000:]
        assert "search done on postgresql://postgres:***@" in log  # the password never printed
    _, trials = _trials(postgres_url)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 4 <= len(finished) <= 5  # MaxTrialsCallback: a trial already running may finish as the 5th
    assert len({t.params["lr"] for t in trials}) == len(trials)  # workers drew different lrs
    out = tmp_path / "final"
    assert main(_args(data, out, "--storage", postgres_url, "--hpo-trials", "4")) == 0
    assert len(_trials(postgres_url)[1]) == len(trials)
    assert len(list(out.rglob("result.json"))) == 2 and (out / "tables.md").is_file()
