"""The `peftvision` logger: what apply did, at INFO and DEBUG; silent unless asked."""

import logging

import peftvision as pv
from tests.models import tiny_vit


def test_apply_logs_methods_wrapped_modules_and_selected_parameters(caplog):
    model = tiny_vit()  # depth 2: one qkv Linear per block
    with caplog.at_level(logging.DEBUG, logger="peftvision"):
        pv.apply(model, [pv.config("lora", r=2), "bias"])
    records = [r for r in caplog.records if r.name == "peftvision"]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert "apply lora on VisionTransformer (vit): 2 modules wrapped, 0 parameters selected" in info
    n_bias = sum(1 for name, _ in model.named_parameters() if name.endswith("bias")
                 and not name.startswith("head") and "lora" not in name)
    assert f"apply bias on VisionTransformer (vit): 0 modules wrapped, {n_bias} parameters selected" in info
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(m.startswith(f"trainable parameters: {trainable:,} of ") for m in info)
    assert "lora wraps blocks.0.attn.qkv" in debug and "lora wraps blocks.1.attn.qkv" in debug
    assert "bias selects blocks.0.attn.qkv.bias" in debug
    assert "head trains: head.weight, head.bias" in debug


def test_info_level_has_no_per_module_lines(caplog):
    with caplog.at_level(logging.INFO, logger="peftvision"):
        pv.apply(tiny_vit(), "lora", r=2)
    assert [r.levelno for r in caplog.records if r.name == "peftvision"] == [logging.INFO] * 2


def test_silent_by_default(capsys):
    # a library logger: a NullHandler, nothing printed unless the application configures logging
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("peftvision").handlers)
    pv.apply(tiny_vit(), "lora", r=2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
