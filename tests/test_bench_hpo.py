"""benchmarks/hpo.py: Optuna search + successive-halving pruning + retrain, on a fake objective.

The fake objective is a deterministic function of the learning rate (best at OPT_LR) that reports
a rising curve per epoch, so pruning has something to prune. The PostgreSQL test starts its own
throwaway server from the installed binaries (Debian's `postgresql` package) and skips where it
cannot; the real-training test runs benchmarks.train where it exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from benchmarks.hpo import (  # noqa: E402
    add_hpo_parser,
    cmd_hpo,
    default_study_name,
    macro_f1,
    run_from_args,
    run_hpo,
    storage_url,
)

REPO = Path(__file__).resolve().parents[1]
OPT_LR = 3e-3


@dataclasses.dataclass
class Cfg:
    """Stand-in for benchmarks.train.RunConfig (same fields), so these tests need no training."""

    dataset: str = "toy"
    model: str = "tiny"
    method: str | list[str] = "lora"
    method_options: dict = dataclasses.field(default_factory=dict)
    epochs: int = 9
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    image_size: int = 224
    seed: int = 0
    data_fraction: float = 1.0
    warmup_epochs: int = 1
    patience: int = 5
    pretrained: bool = True
    weights: str | None = None
    num_workers: int = 0
    device: str = "auto"
    out: str | None = None
    quiet: bool = False


def fake_objective(cfg, on_epoch=None, calls: list | None = None) -> dict:
    """Val macro-F1 peaks at lr = OPT_LR (1.0 there) and rises with the epochs; test adds seed."""
    if calls is not None:
        calls.append(cfg)
    quality = math.exp(-math.log10(cfg.lr / OPT_LR) ** 2)
    best = 0.0
    for epoch in range(cfg.epochs):
        f1 = quality * (1 - 0.5 ** (epoch + 1))
        best = max(best, f1)
        if on_epoch is not None:
            on_epoch(epoch, f1)  # raises optuna.TrialPruned when the pruner says so
    # The layout of run_experiment's result["metrics"].
    return {"metrics": {"val": {"macro_f1": best, "accuracy": best},
                        "test": {"macro_f1": best - 0.05 + 0.01 * cfg.seed, "accuracy": 0.5},
                        "best_val_macro_f1": best, "epochs_run": cfg.epochs}}


def recording():
    calls: list = []
    return calls, lambda cfg, on_epoch=None: fake_objective(cfg, on_epoch, calls)


@pytest.fixture
def db_dir(tmp_path):
    """Where the SQLite file goes: in memory-backed /dev/shm where there is one (each trial
    commits several times, and waiting on disk syncs made these tests five times slower)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="pv-hpo-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sqlite(db_dir) -> str:
    return f"sqlite:///{db_dir / 'db' / 'hpo.db'}"  # db/ does not exist yet: run_hpo makes it


def test_sqlite_study_persists_and_resumes(db_dir):
    url = sqlite(db_dir)
    first = run_hpo(Cfg(), trials=6, storage=url, study_name="s", objective_fn=fake_objective,
                    retrain=False)
    assert (db_dir / "db" / "hpo.db").is_file()
    assert sum(first["n_trials"].values()) == 6 and first["retrain"] is None

    # A new process (here: a new call) loads the study from the file and adds trials to it.
    second = run_hpo(Cfg(), trials=4, storage=url, study_name="s", objective_fn=fake_objective,
                     retrain=False)
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == 10 == sum(second["n_trials"].values())
    assert [r["number"] for r in second["trials"]] == list(range(10))
    # The resumed search draws new learning rates, not a replay of its first ones.
    lrs = [t.params["lr"] for t in study.trials]
    assert len(set(lrs)) == 10

    # total_trials caps the study, counting what is already there.
    third = run_hpo(Cfg(), trials=50, total_trials=12, storage=url, study_name="s",
                    objective_fn=fake_objective, retrain=False)
    assert sum(third["n_trials"].values()) == 12


@pytest.mark.slow
def test_pruning_prunes_and_finds_the_optimum(db_dir):
    summary = run_hpo(Cfg(epochs=9), trials=20, storage=sqlite(db_dir), study_name="p",
                      objective_fn=fake_objective, retrain=False)
    counts = summary["n_trials"]
    assert counts.get("PRUNED", 0) >= 5, counts
    assert counts.get("COMPLETE", 0) >= 2, counts
    epochs = {r["state"]: [] for r in summary["trials"]}
    for r in summary["trials"]:
        epochs[r["state"]].append(r["epochs"])
    assert max(epochs["PRUNED"]) < 9 and set(epochs["COMPLETE"]) == {9}
    best_lr = summary["best"]["params"]["lr"]
    assert abs(math.log10(best_lr / OPT_LR)) < 0.3, best_lr
    assert summary["best"]["val_macro_f1"] > 0.9
    # Search trials keep validation metrics only, and write no run folders.
    study = optuna.load_study(study_name="p", storage=sqlite(db_dir))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(set(t.user_attrs["metrics"]) == {"val_macro_f1", "val_accuracy",
                                                "best_val_macro_f1", "epochs_run"} for t in done)


def test_retrain_best_with_three_seeds(tmp_path, db_dir):
    calls, objective = recording()
    out = tmp_path / "out"
    summary = run_hpo(Cfg(out=str(out)), trials=8, storage=sqlite(db_dir), study_name="r",
                      objective_fn=objective, seeds=(0, 1, 2))
    search, retrain = calls[:8], calls[8:]
    assert all(c.out is None for c in search)
    assert [c.seed for c in retrain] == [0, 1, 2]
    assert [c.out for c in retrain] == [str(out / f"seed{s}") for s in (0, 1, 2)]
    best_lr = summary["best"]["params"]["lr"]
    assert all(c.lr == best_lr for c in retrain)

    rt = summary["retrain"]
    tests = [r["test_macro_f1"] for r in rt["runs"]]
    assert tests[1] - tests[0] == pytest.approx(0.01) and tests[2] - tests[1] == pytest.approx(0.01)
    assert rt["test_macro_f1_mean"] == pytest.approx(statistics.fmean(tests))
    assert rt["test_macro_f1_std"] == pytest.approx(0.01)  # sample std of x, x+.01, x+.02
    assert "±" in rt["test_macro_f1"]

    written = json.loads((out / "hpo_summary.json").read_text())
    assert written["retrain"]["test_macro_f1_mean"] == pytest.approx(rt["test_macro_f1_mean"])
    assert written["best"] == summary["best"]
    assert len(written["trials"]) == 8 and written["base_config"]["dataset"] == "toy"


def test_weight_decay_search_and_fixed_settings_check(db_dir):
    calls, objective = recording()
    url = sqlite(db_dir)
    summary = run_hpo(Cfg(), trials=4, storage=url, study_name="wd", search_weight_decay=True,
                      weight_decay_range=(1e-3, 1e-1), objective_fn=objective, seeds=(0,))
    assert all(1e-3 <= c.weight_decay <= 1e-1 for c in calls)
    assert set(summary["best"]["params"]) == {"lr", "weight_decay"}
    assert calls[-1].weight_decay == summary["best"]["params"]["weight_decay"]
    assert summary["retrain"]["test_macro_f1_std"] == 0.0  # one seed

    # Adding trials run under other fixed settings would mix two searches: refused.
    with pytest.raises(ValueError, match="epochs"):
        run_hpo(Cfg(epochs=3), trials=1, storage=url, study_name="wd",
                search_weight_decay=True, weight_decay_range=(1e-3, 1e-1),
                objective_fn=fake_objective)
    with pytest.raises(ValueError, match="search_space"):
        run_hpo(Cfg(), trials=1, storage=url, study_name="wd", objective_fn=fake_objective)
    # Machine-specific settings may differ between workers.
    run_hpo(Cfg(device="cpu", num_workers=4), trials=1, storage=url, study_name="wd",
            search_weight_decay=True, weight_decay_range=(1e-3, 1e-1),
            objective_fn=fake_objective, retrain=False)


def test_no_completed_trial_to_retrain_is_a_clear_error(db_dir):
    with pytest.raises(ValueError, match="no completed trial"):
        run_hpo(Cfg(), trials=0, storage=sqlite(db_dir), study_name="e",
                objective_fn=fake_objective)


def test_flat_metrics_layout_and_postgres_driver():
    assert macro_f1({"val_macro_f1": 0.5, "test_macro_f1": 0.4}, "test") == 0.4
    assert macro_f1({"val": {"macro_f1": 0.5}}, "val") == 0.5
    assert storage_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert storage_url("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert storage_url("sqlite:///runs/hpo.db") == "sqlite:///runs/hpo.db"


def test_default_study_name():
    assert default_study_name(Cfg()) == "toy.tiny.lora"
    cfg = Cfg(method=["lora", "bitfit"], method_options={"r": 8, "alpha": 16})
    assert default_study_name(cfg) == "toy.tiny.lora+bitfit[alpha=16,r=8]"


def test_cli(tmp_path, db_dir, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    add_hpo_parser(parser.add_subparsers(dest="command"))
    url = sqlite(db_dir)
    args = parser.parse_args([
        "hpo", "--dataset", "toy", "--model", "tiny", "--method", "lora", "--option", "r=8",
        "--trials", "5", "--epochs", "3", "--image-size", "32", "--no-pretrained",
        "--storage", url, "--seeds", "0", "1", "--out", str(tmp_path / "out")])
    calls, objective = recording()
    summary = run_from_args(args, objective_fn=objective, config_cls=Cfg)
    assert summary["study"] == "toy.tiny.lora[r=8]"
    cfg = calls[0]
    assert (cfg.epochs, cfg.image_size, cfg.pretrained, cfg.method_options) == (3, 32, False, {"r": 8})
    assert cfg.batch_size == 32  # not given: the config's default
    assert [c.seed for c in calls[5:]] == [0, 1]
    out = capsys.readouterr().out
    assert "test macro-F1" in out and "hpo_summary.json" in out

    # A worker: adds trials, no retrain; the default out folder is named after the study.
    args = parser.parse_args(["hpo", "--dataset", "toy", "--model", "tiny", "--method", "lora",
                              "--option", "r=8", "--epochs", "3", "--image-size", "32",
                              "--no-pretrained", "--trials", "2", "--storage", url, "--no-retrain"])
    assert args.func is cmd_hpo  # what benchmarks/cli.py calls: an exit code, like its commands
    monkeypatch.chdir(tmp_path)
    summary = run_from_args(args, objective_fn=fake_objective, config_cls=Cfg)
    assert summary["retrain"] is None and sum(summary["n_trials"].values()) == 7
    assert (tmp_path / "runs" / "hpo" / "toy.tiny.lora[r=8]" / "hpo_summary.json").is_file()


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway server on a free loopback port, two worker processes on one study.

def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").is_file():
        return Path(found).resolve().parent
    # Debian keeps the server binaries off PATH, one folder per major version.
    dirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
            if (p.parent / "initdb").is_file() and p.parts[-3].isdigit()]
    return max(dirs, key=lambda d: int(d.parts[-2]), default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[bench]')")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
                    "`postgresql` package to run the shared-study test")
    kwargs: dict = {}
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root: run it as an unprivileged user
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                pass
        if user is None:
            pytest.skip("running as root and no unprivileged user (postgres, nobody) to run "
                        "the PostgreSQL server as")
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    home = Path(tempfile.mkdtemp(prefix="pv-pg-"))  # under /tmp: reachable by that user
    if user is not None:
        os.chown(home, user.pw_uid, user.pw_gid)
    data, log, port = home / "data", home / "server.log", _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "HOME": str(home)}

    def pg(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True,
                              timeout=120, **kwargs)

    def tail(proc) -> str:
        logged = log.read_text()[-800:] if log.is_file() else ""
        return f"{(proc.stdout + proc.stderr)[-800:]}{logged}".strip()

    def give_up(why: str):
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(why)

    try:
        proc = pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                  "--no-locale", "-E", "UTF8", "--no-sync")
        if proc.returncode:
            give_up(f"could not initdb a throwaway PostgreSQL cluster: {tail(proc)}")
        opts = (f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=40 -c shared_buffers=16MB")
        proc = pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                  "-w", "-t", "60", "start")
        if proc.returncode:
            give_up(f"could not start a throwaway PostgreSQL server: {tail(proc)}")
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"could not run the PostgreSQL server binaries in {bindir}: {exc}")
    try:
        # trust auth on loopback: the password is ignored, and is here to test its redaction
        yield f"postgresql://postgres:secret@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


def pg_worker(url: str, study: str, trials: int, sampler_seed: int) -> None:
    """One worker process: what `python -m benchmarks hpo ... --no-retrain` does, fake objective."""
    run_hpo(Cfg(), trials=trials, storage=url, study_name=study, sampler_seed=sampler_seed,
            objective_fn=fake_objective, retrain=False)


@pytest.mark.slow
def test_postgresql_workers_share_one_study(postgres_url, tmp_path):
    code = ("import sys; from test_bench_hpo import pg_worker; "
            "pg_worker(sys.argv[1], 'shared', int(sys.argv[2]), int(sys.argv[3]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", code, postgres_url, str(n), str(seed)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for n, seed in ((6, 1), (5, 2))]
    for w in workers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert len(study.trials) == 11
    assert len({t.params["lr"] for t in study.trials}) == 11  # different seeds: no duplicates
    assert sorted(t.number for t in study.trials) == list(range(11))

    # Reading the results: a process that runs no trials, retrains the best and writes the summary.
    summary = run_hpo(Cfg(out=str(tmp_path / "out")), trials=0, storage=postgres_url,
                      study_name="shared", objective_fn=fake_objective, seeds=(0, 1))
    assert sum(summary["n_trials"].values()) == 11
    assert summary["best"]["val_macro_f1"] == max(t.value for t in study.trials
                                                  if t.value is not None)
    assert len(summary["retrain"]["runs"]) == 2
    assert "secret" not in summary["storage"] and "***" in summary["storage"]
    assert "secret" not in (tmp_path / "out" / "hpo_summary.json").read_text()


# ---------------------------------------------------------------------------------------------
# The real thing: benchmarks.train.run_experiment through the HPO path, tiny settings.

def test_real_training_through_hpo(tmp_path, db_dir, capsys):
    """`python -m benchmarks hpo` on the generated demo data: real RunConfig, real training."""
    pytest.importorskip("benchmarks.train", reason="benchmarks/train.py not there yet")
    from benchmarks.hpo import main

    out = tmp_path / "out"
    code = main(["--dataset", "demo", "--model", "tiny-resnet", "--method", "lora",
                 "--option", "r=2", "--epochs", "2", "--image-size", "32", "--no-pretrained",
                 "--device", "cpu", "--quiet", "--trials", "2", "--seeds", "0",
                 "--storage", sqlite(db_dir), "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "hpo_summary.json").read_text())
    assert summary["study"] == "demo.tiny-resnet.lora[r=2]"
    assert sum(summary["n_trials"].values()) == 2
    assert summary["base_config"]["method_options"] == {"r": 2}
    run = summary["retrain"]["runs"][0]
    assert 0.0 <= run["test_macro_f1"] <= 1.0
    assert list((out / "seed0").glob("*/result.json"))  # run_experiment's own result file
    assert "test macro-F1" in capsys.readouterr().out


@pytest.mark.parametrize("setting, shown", [("1", True), ("0", False)])
def test_trials_progress_bar_follows_the_progress_setting(db_dir, monkeypatch, capsys, setting, shown):
    monkeypatch.setenv("PEFTVISION_PROGRESS", setting)
    run_hpo(Cfg(), trials=2, storage=sqlite(db_dir), study_name="bar", objective_fn=fake_objective,
            retrain=False)
    assert ("2/2" in capsys.readouterr().err) == shown
