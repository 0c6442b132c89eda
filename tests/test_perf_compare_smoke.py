"""Tiny-size smoke run of benchmarks.perf.compare: every stage (worker processes, peft peers,
interleaved steps, per-process peak RSS, inference modes, adapter files, apply timing, JSON,
markdown). The figures come from the full-size run, not from here."""

import json

import pytest

from benchmarks.perf import compare


@pytest.mark.slow
def test_compare_benchmark_tiny(tmp_path, capsys):
    out, md = tmp_path / "compare.json", tmp_path / "performance.md"
    compare.main(["--tiny", "--methods", "lora,bias,layernorm,full", "--steps", "1",
                  "--warmup", "1", "--infer-reps", "1", "--solo", "unet:full",
                  "--out", str(out), "--markdown", str(md)])
    printed = capsys.readouterr().out
    assert "CPU vs peft" in printed and "## Targets" in printed

    data = json.loads(out.read_text())
    assert data["environment"]["peft"] and data["environment"]["torch_threads"] == 1
    assert set(data["models"]) == {"vit-tiny", "resnet50-tiny", "unet-tiny"}
    for entry in data["models"].values():
        rows = {r["label"]: r for r in entry["rows"]}
        assert not [(n, r["error"]) for n, r in rows.items() if r["error"]]
        assert {"frozen", "lora", "peft:lora", "bias"} <= set(rows)
        for r in rows.values():
            assert len(r["step_times_s"]) == 1 and r["median_cpu_s"] > 0
            assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0  # measured in its own process
        lora, peer = rows["lora"], rows["peft:lora"]
        # the same model and config: the same trainable count and the same first loss
        assert lora["trainable_params"] == peer["trainable_params"]
        assert abs(lora["losses"][0] - peer["losses"][0]) <= 1e-4 * abs(peer["losses"][0])
        assert abs(lora["losses"][0] - rows["frozen"]["losses"][0]) <= 1e-4 * abs(peer["losses"][0])
        assert lora["cpu_vs_peft"] > 0 and lora["peak_vs_peft"] > 0 and lora["adapter_bytes"] > 0
        unloaded = lora["infer"]["unloaded"]
        assert unloaded["structure_equal_base"] and unloaded["cpu_vs_base"] > 0
        assert lora["infer"]["merged"]["max_rel_diff"] < 1e-4  # merged == unmerged outputs
        for r in (lora, peer):  # merge cost side by side: timed unmerge + merge cycles
            merged = r["infer"]["merged"]
            assert len(merged["merge_cpu_s"]) == len(merged["unmerge_cpu_s"]) == 7
    unet = {r["label"]: r for r in data["models"]["unet-tiny"]["rows"]}
    assert unet["full"]["group"] == 1 and "frozen@1" in unet  # the solo group, own reference
    assert unet["full"]["cpu_vs_lora"] > 0
    vit = {r["label"]: r for r in data["models"]["vit-tiny"]["rows"]}
    assert vit["layernorm"]["trainable_params"] == vit["peft:ln_tuning"]["trainable_params"]
    assert set(data["apply_timing"]) == {"vit-tiny", "unet-tiny"}
    for res in data["apply_timing"].values():
        timing = {(r["library"], r["method"], r["targets"]): r for r in res["rows"]}
        assert not [r["error"] for r in res["rows"] if r.get("error")]
        assert timing[("peftvision", "lora", None)]["apply_s"] > 0
        assert timing[("peft", "lora", None)]["apply_s"] > 0
        svd = [r for r in res["rows"] if r["method"] == "svdiff"]
        assert svd and svd[-1]["apply_s"] > 0

    text = md.read_text()
    assert text.startswith("# Performance") and "| lora |" in text and "peft:lora" in text
    assert "LoRA merge <= 1.00x peft" in text and "LoRA unmerge <= 1.00x peft" in text
    # rendering again from the JSON alone gives the same document
    compare.main(["--render", "--out", str(out), "--markdown", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == text


def test_svdiff_state_section(tmp_path):
    # --model none: only the SD-1.5 state count (meta device), rendered with its target
    out, md = tmp_path / "state.json", tmp_path / "state.md"
    compare.main(["--model", "none", "--no-apply-timing", "--svdiff-state", "--out", str(out),
                  "--markdown", str(md)])
    state = json.loads(out.read_text())["svdiff_state"]
    ratios = {r["factors"]: r["ratio"] for r in state["rows"]}
    assert ratios["one"] < ratios["auto"] <= 1.5 < 2 < ratios["both"]
    text = md.read_text()
    assert "## SV-Diff state on the SD-1.5 UNet" in text
    assert "| svdiff state (factors=auto) <= 1.50x the UNet | sd15-unet |" in text and "| met |" in text
