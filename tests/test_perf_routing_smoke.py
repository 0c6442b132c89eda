"""Smoke run of the per-sample routing benchmark on a tiny ViT (figures come from the ViT-B run)."""

from benchmarks.perf import routing


def test_routing_benchmark_tiny(tmp_path, capsys):
    page = tmp_path / "routing.md"
    result = routing.main(["--tiny", "--batch", "10", "--adapters", "3", "--repeats", "1", "--warmup", "0",
                           "--markdown", str(page)])
    printed = capsys.readouterr().out
    assert "routed and peft outputs equal the loop's" in printed
    assert set(result["ms"]) == {"routed", "peft", "loop", "one"}
    assert all(v["cpu"] > 0 and v["wall"] > 0 for v in result["ms"].values())
    assert result["names"] == ["a0", "a1", "a2", None] * 2 + ["a0", "a1"]
    assert "| routed |" in page.read_text() and "--tiny" in page.read_text()
