"""The `peftvision` command line, run in-process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import peftvision as pv
from peftvision.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_methods_lists_every_method(capsys):
    main(["methods"])
    out = capsys.readouterr().out
    for name in pv.methods():
        assert name in out


def test_report_counts_without_weights(capsys):
    main(["report", "vit_tiny_patch16_224", "lora", "r=4", "qkv_parts=qv", "--json"])
    report = json.loads(capsys.readouterr().out)
    # 12 blocks x (q and v) x r=4 x (192 in + 192 out), plus the 1000-class head
    assert report["by_method"] == {"lora": 12 * 2 * 4 * (192 + 192), "head": 192 * 1000 + 1000}


def test_report_bad_method_is_a_clean_error():
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        main(["report", "vit_tiny_patch16_224", "nope"])


def test_merge_writes_plain_weights_that_match_the_adapter(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    model = pv.apply(base, "lora", r=2)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.05)
    pv.save_adapter(model, tmp_path / "adapter")
    main(["merge", str(tmp_path / "adapter"), "--base", "resnet10t", "--num-classes", "4",
          "--weights", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "merged.safetensors")])
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    plain.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_push_refuses_a_folder_without_adapter(tmp_path):
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        main(["push", str(tmp_path), "me/repo"])


def test_help_of_each_command(capsys):
    for command in ("methods", "report", "merge", "push"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "key=value" in capsys.readouterr().out


def test_local_weights_for_another_model_are_refused(tmp_path):
    from peftvision.zoo import create_model

    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), str(path))
    with pytest.raises(ValueError, match="weights for another model"):
        create_model("vit_tiny_patch16_224", weights=str(path), image_size=64)


def trained_resnet_adapter(tmp_path, num_classes: int = 4):
    """A LoRA adapter on resnet10t (non-zero B) and the base weights file it was trained on."""
    torch.manual_seed(0)
    base = timm.create_model("resnet10t", pretrained=False, num_classes=num_classes).eval()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    model = pv.apply(base, "lora", r=2)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.05)
    pv.save_adapter(model, tmp_path / "adapter")
    return model


def test_merge_reads_the_class_count_from_the_adapter(tmp_path):
    model = trained_resnet_adapter(tmp_path, num_classes=4)
    main(["merge", str(tmp_path / "adapter"), "--base", "resnet10t",  # no --num-classes
          "--weights", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "merged.safetensors")])
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert merged["fc.weight"].shape == (4, 512)
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    plain.load_state_dict(merged)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No offline flag, an endpoint where nothing listens, and an empty Hub cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_merge_offline_is_one_line_with_the_hint(tmp_path, unreachable_hub):
    trained_resnet_adapter(tmp_path)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["merge", str(tmp_path / "adapter"), "--base", "resnet10t",
              "--out", str(tmp_path / "merged.safetensors")])
    message = str(info.value)
    assert message.startswith("peftvision: could not get pretrained weights for 'resnet10t'")
    assert "--weights FILE" in message and "--no-pretrained" in message and "\n" not in message
    assert time.perf_counter() - start < 20  # no minute of Hub retries
    assert not (tmp_path / "merged.safetensors").exists()


def test_merge_unknown_base_is_one_line(tmp_path):
    trained_resnet_adapter(tmp_path)
    with pytest.raises(SystemExit, match="--base 'resnet10tt': Unknown model"):
        main(["merge", str(tmp_path / "adapter"), "--base", "resnet10tt", "--no-pretrained",
              "--out", str(tmp_path / "merged.safetensors")])


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "peftvision.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120, **kw)


def test_methods_into_a_closed_pipe_is_quiet():
    # `peftvision methods | head -1`: the reader goes away before everything is written
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "peftvision.cli", "methods"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftvision {pv.__version__}"


def test_bench_help_and_bench_point_at_python_m_benchmarks(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    assert "python -m benchmarks" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="python -m benchmarks demo"):
        main(["bench", "demo"])


def test_the_library_never_reaches_into_benchmarks():
    """The installed package neither imports nor runs the (unpackaged) benchmarks/."""
    import ast

    for path in sorted((REPO / "peftvision").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("benchmarks", "subprocess") for n in names), path


def test_targets_names_on_the_command_line_match_by_suffix(capsys):
    main(["report", "vit_tiny_patch16_224", "lora", "r=4", "targets=qkv", "--json"])
    by_suffix = json.loads(capsys.readouterr().out)["by_method"]["lora"]
    main(["report", "vit_tiny_patch16_224", "lora", "r=4", "--json"])  # the preset: every qkv
    assert by_suffix == json.loads(capsys.readouterr().out)["by_method"]["lora"] == 12 * 4 * (192 + 576)
    main(["report", "vit_tiny_patch16_224", "lora", "r=4", "targets=qkv,proj", "--json"])
    # "proj" is attn.proj in every block and patch_embed.proj (a 16x16 conv, 3 -> 192 channels)
    attn_proj, patch_proj = 12 * 4 * (192 + 192), 4 * (3 * 16 * 16 + 192)
    assert json.loads(capsys.readouterr().out)["by_method"]["lora"] == by_suffix + attn_proj + patch_proj


def test_targets_regex_stays_a_regex(capsys):
    main(["report", "vit_tiny_patch16_224", "lora", "r=4", r"targets=blocks\.0\..*qkv", "--json"])
    assert json.loads(capsys.readouterr().out)["by_method"]["lora"] == 4 * (192 + 576)


def test_verbose_logs_what_apply_did():
    proc = run_cli("-v", "report", "vit_tiny_patch16_224", "bias")
    assert proc.returncode == 0, proc.stderr
    assert "INFO peftvision: apply bias on VisionTransformer (vit)" in proc.stderr
