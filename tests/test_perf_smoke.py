"""Tiny-size smoke runs of the performance benchmarks (figures come from the full-size runs)."""

import json

from benchmarks.perf import bias_step


def test_bias_step_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "bias_step.json"
    bias_step.main(["--tiny", "--model", "all", "--steps", "2", "--warmup", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "bias-naive" in printed and "vs frozen" in printed
    rows = json.loads(out.read_text())["rows"]
    variants = {(r["model"], r["variant"]) for r in rows}
    assert {v for _, v in variants} == {"frozen", "bias", "bias-naive", "lora"}
    assert all(r["median_step_s"] > 0 and r["ratio_vs_lora"] > 0 for r in rows)


def test_qlora_benchmark_tiny(capsys):
    import pytest

    pytest.importorskip("bitsandbytes")
    from benchmarks.perf import qlora

    qlora.main(["--tiny", "--steps", "1"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"float32", "int8", "nf4"}
    assert float(rows["float32"][3]) == 0.0  # drift of the float model against itself
    assert float(rows["nf4"][2]) < float(rows["int8"][2]) < 1.0  # weight memory vs float
    assert len({r[4] for r in rows.values()}) == 1  # LoRA trains the same count on every base


def test_mixing_benchmark_tiny(tmp_path, capsys):
    import pytest

    pytest.importorskip("peft")
    from benchmarks.perf import mixing

    out = tmp_path / "mixing.json"
    rows = mixing.main(["--tiny", "--reps", "1", "--out", str(out)])
    assert [r["kind"] for r in rows] == ["cat", "svd", "svd", "linear"]
    assert all(r["max_abs_diff"] <= 1e-5 * max(1.0, r["output_max_abs"]) for r in rows)  # same mixes
    svd = [r for r in rows if r["kind"] == "svd"]
    assert all(abs(r["svd_rel_error"] - r["best_rel_error"]) < 1e-4 for r in svd)  # Eckart–Young
    assert json.loads(out.read_text())["rows"] == rows
    assert "peftvision s" in capsys.readouterr().out
