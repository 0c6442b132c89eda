"""The `peftvision` command line, run in-process."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import peftvision as pv
from peftvision.cli import main


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
