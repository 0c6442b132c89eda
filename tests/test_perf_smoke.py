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
