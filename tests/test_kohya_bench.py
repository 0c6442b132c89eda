"""The kohya loading benchmark runs (tiny UNet) and its figures say what they claim."""

import pytest

pytest.importorskip("diffusers")


def test_kohya_load_benchmark_smoke(capsys):
    from benchmarks.perf import kohya_load

    result = kohya_load.main(["--tiny", "--reps", "1"])
    assert result["layers"] > 0 and result["max_abs_lora_effect"] > 1e-3
    assert result["max_abs_ours_vs_diffusers"] <= 1e-5
    assert result["max_abs_saved_file_in_diffusers_vs_ours"] <= 1e-5
    assert "ratio" in capsys.readouterr().out
