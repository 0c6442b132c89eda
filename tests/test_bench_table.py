"""benchmarks/table.py + plot.py: ranking, aggregation and rendering on hand-computed small cases."""

import csv
import json

import pytest

from benchmarks.results import KIND, load_results, row, write_result
from benchmarks.table import (
    average_ranks,
    build_tables,
    human,
    leaderboard,
    markdown,
    rank_within,
    write_tables,
)

SIZES = {"busi": {"train": 546, "val": 78, "test": 156}, "ham": {"train": 7000, "val": 1000, "test": 2015}}
PARAMS = {"full": 23_500_000, "linear": 0, "lora": 300_000, "bias": 50_000}


def fake_result(dataset, method, seed, f1, fraction=1.0, model="resnet50", acc=None):
    """The fields of a run result that tables and plots read."""
    return {
        "kind": KIND, "schema": 1,
        "config": {"data_fraction": fraction, "seed": seed},
        "method": {"label": method, "names": method.split("+"), "options": {}},
        "dataset": {"name": dataset, "split": {"sizes": SIZES[dataset]}},
        "model": {"name": model, "pretrained": True},
        "metrics": {"test": {"macro_f1": f1, "accuracy": acc if acc is not None else f1, "auroc": 0.9}},
        "parameters": {"trainable": PARAMS[method] + 2048, "method_params": PARAMS[method],
                       "total": 23_510_000},
        "wall_time_s": 1.0,
    }


# full beats lora on busi, lora beats full on ham; bias ties lora on ham; linear is last on both
F1 = {("busi", "full"): (0.80, 0.82), ("busi", "lora"): (0.78, 0.78), ("busi", "linear"): (0.50, 0.60),
      ("busi", "bias"): (0.70, 0.70), ("ham", "full"): (0.60, 0.60), ("ham", "lora"): (0.70, 0.70),
      ("ham", "linear"): (0.40, 0.40), ("ham", "bias"): (0.70, 0.70)}


@pytest.fixture
def results():
    return [fake_result(d, m, seed, f1) for (d, m), f1s in F1.items() for seed, f1 in enumerate(f1s)]


def test_rank_within_shares_ranks_on_ties():
    assert rank_within({"a": 0.9, "b": 0.8, "c": 0.9, "d": None}) == {"a": 1.5, "c": 1.5, "b": 3.0}
    assert rank_within({"a": 0.5, "b": 0.5, "c": 0.5}) == {"a": 2.0, "b": 2.0, "c": 2.0}


def test_average_ranks_by_hand():
    ranks = average_ranks({"d1": {"a": 0.9, "b": 0.8}, "d2": {"a": 0.7, "b": 0.8, "c": 0.1}})
    assert ranks == {"a": 1.5, "b": 1.5, "c": 3.0}  # c ranked on d2 only


def test_table_cells_averages_and_ranks(results):
    (table,) = build_tables([row(r) for r in results])
    assert table.methods == ["full", "linear", "bias", "lora"]  # references first, then by size
    assert table.datasets == ["busi", "ham"]
    cell = table.cells["busi", "full"]
    assert cell.mean == pytest.approx(81.0) and cell.std == pytest.approx(1.41421356) and cell.n == 2
    assert table.cells["busi", "lora"].std == pytest.approx(0.0)
    assert table.average("full") == pytest.approx((81 + 60) / 2)
    # busi: full 1, lora 2, bias 3, linear 4;  ham: lora/bias 1.5 each, full 3, linear 4
    assert table.ranks() == pytest.approx({"full": 2.0, "lora": 1.75, "bias": 2.25, "linear": 4.0})


def test_markdown_layout(results):
    (table,) = build_tables([row(r) for r in results])
    md = markdown(table)
    lines = md.splitlines()
    assert "resnet50, 100% of the training data, pretrained: test macro-F1 (%)" in lines[0]
    assert lines[2] == "| dataset (train/val/test) | full<br>23.5M | linear<br>0 | bias<br>50.0K | lora<br>300.0K |"
    assert lines[4] == "| busi 780 (546/78/156) | **81.0±1.4** | 55.0±7.1 | 70.0±0.0 | 78.0±0.0 |"
    assert lines[5] == "| ham 10015 (7000/1000/2015) | 60.0±0.0 | 40.0±0.0 | **70.0±0.0** | **70.0±0.0** |"
    assert lines[6] == "| average | 70.5 | 47.5 | 70.0 | 74.0 |"
    assert lines[7] == "| average rank | 2.00 | 4.00 | 2.25 | 1.75 |"


def test_missing_cells_are_marked(results):
    rows = [row(r) for r in results if not (r["dataset"]["name"] == "ham" and r["method"]["label"] == "bias")]
    md = markdown(build_tables(rows)[0])
    assert "| ham 10015 (7000/1000/2015) | 60.0±0.0 | 40.0±0.0 | – | **70.0±0.0** |" in md
    assert "| average | 70.5 | 47.5 | 70.0* | 74.0 |" in md
    # busi: full 1, lora 2, bias 3, linear 4;  ham: lora 1, full 2, linear 3
    assert "| average rank | 1.50 | 3.50 | 3.00* | 1.50 |" in md
    assert "averaged over the datasets where the method has results" in md


def test_tables_split_by_model_and_fraction(results):
    more = results + [fake_result("busi", "lora", 0, 0.5, fraction=0.1),
                      fake_result("busi", "lora", 0, 0.9, model="vit_base")]
    tables = build_tables([row(r) for r in more], metric="accuracy")
    assert [(t.model, t.fraction) for t in tables] == [("resnet50", 1.0), ("resnet50", 0.1), ("vit_base", 1.0)]
    assert "test accuracy" in tables[1].title and "10% of the training data" in tables[1].title
    assert "| busi 780 (546/78/156) | **50.0** |" in markdown(tables[1])  # one seed: no ±


def test_write_tables_reads_only_result_files(tmp_path, results):
    for i, r in enumerate(results):
        write_result(r, tmp_path / f"run{i}")
    (tmp_path / "other.json").write_text(json.dumps({"not": "a result"}))
    (tmp_path / "broken.json").write_text("{")
    assert len(load_results(tmp_path)) == len(results)
    files = write_tables(tmp_path, out=tmp_path / "tables")
    assert files["markdown"].read_text().startswith("### resnet50")
    blocks = files["csv"].read_text().strip().split("\n\n")
    lines = list(csv.reader(blocks[0].splitlines()))
    assert lines[1][:7] == ["dataset", "size", "train", "val", "test", "full mean", "full std"]
    assert lines[3][:7] == ["busi", "780", "546", "78", "156", "81.0000", "1.4142"]
    assert lines[-1][0] == "average rank" and lines[-1][5] == "2.0000"
    summary = list(csv.DictReader(files["summary"].read_text().splitlines()))
    assert len(summary) == 8 and {r["n_seeds"] for r in summary} == {"2"}


def test_write_tables_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run results"):
        write_tables(tmp_path)


def test_leaderboard_orders_methods_by_f1(results):
    text = leaderboard([row(r) for r in results if r["dataset"]["name"] == "busi"])
    order = [line.split()[0] for line in text.splitlines()[2:]]
    assert order == ["full", "lora", "bias", "linear"]


def test_human():
    assert [human(0), human(516), human(1300), human(23_500_000), human(632_000_000)] == [
        "0", "516", "1.30K", "23.5M", "632.0M"]


def test_plots_are_written(tmp_path, results):
    from benchmarks.plot import write_plots

    sweep = [fake_result("busi", m, s, f1 * f, fraction=f) for m, f1 in (("full", 0.8), ("lora", 0.75))
             for f in (0.1, 0.5) for s in (0, 1)]
    for i, r in enumerate(results + sweep):
        write_result(r, tmp_path / f"run{i}")
    paths = write_plots(tmp_path)
    assert sorted(p.name for p in paths) == ["figure1_data_volume.png", "figure1_data_volume.svg",
                                             "figure3_parameters.png", "figure3_parameters.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
