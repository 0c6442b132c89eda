"""Bad inputs: the right exception type, a message that names the problem (and the fix), and a
model left exactly as it was (state dict bitwise, module types, requires_grad flags, no state)."""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model, run
from torch import nn

import peftvision as pv
from peftvision import (
    ConfigError,
    MergeError,
    PeftVisionError,
    TargetError,
    UnknownMethodError,
    UnsupportedArchitectureError,
)
from peftvision.layers import AdapterLayer


class Snapshot:
    """Everything about a model that a failed call must not change."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.types = [(name, type(m)) for name, m in model.named_modules()]
        self.grads = {name: p.requires_grad for name, p in model.named_parameters()}
        self.record = self.summary(model)
        self.merged = [m.merged for m in model.modules() if isinstance(m, AdapterLayer)]

    def assert_unchanged(self, model: nn.Module) -> None:
        state = model.state_dict()
        assert list(state) == list(self.state), "state-dict keys changed"
        for key, value in self.state.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        assert [(name, type(m)) for name, m in model.named_modules()] == self.types
        assert {name: p.requires_grad for name, p in model.named_parameters()} == self.grads
        assert [m.merged for m in model.modules() if isinstance(m, AdapterLayer)] == self.merged
        assert self.summary(model) == self.record

    @staticmethod
    def summary(model: nn.Module):
        record = pv.applied(model)
        if record is None:
            return None
        return record.head, [(m.name, m.config, m.selected, m.wrapped) for m in record.methods]


def fresh(arch: str) -> nn.Module:
    """A tiny model with one parameter already frozen by the user, so that restoring
    requires_grad flags is observable (not just 'all True')."""
    model = make_model(arch)
    next(model.parameters()).requires_grad_(False)
    return model


def fails(model: nn.Module, exc_type, *phrases: str, call=None, **kwargs) -> str:
    """Run `call` (default: apply(model, **kwargs)), expect `exc_type` whose message contains
    every phrase, and check the model is unchanged. Returns the message."""
    snap = Snapshot(model)
    with pytest.raises(exc_type) as info:
        (call or (lambda: pv.apply(model, **kwargs)))()
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    snap.assert_unchanged(model)
    return message


# ---- method names and config values -------------------------------------------------------

def test_unknown_method_lists_available_methods():
    message = fails(fresh("vit"), UnknownMethodError, "'loraa'", "available methods", method="loraa")
    for name in pv.methods():
        assert name in message
    assert not message.startswith('"')  # not KeyError's quoted repr


BAD_CONFIGS = [
    ("lora", {"r": 0}, "r must be a positive integer"),
    ("lora", {"r": -2}, "r must be a positive integer"),
    ("lora", {"r": 1.5}, "r must be a positive integer"),
    ("lora", {"r": True}, "r must be a positive integer"),  # bool is an int subclass
    ("lora", {"alpha": 0}, "alpha must be a number in (0, inf)"),
    ("lora", {"alpha": float("nan")}, "alpha must be a number in (0, inf)"),
    ("lora", {"alpha": "8"}, "alpha"),  # a string from a YAML/CLI config
    ("lora", {"dropout": 1.0}, "dropout must be a number in [0, 1)"),
    ("lora", {"dropout": -0.1}, "dropout must be a number in [0, 1)"),
    ("lora", {"dropout": "0.1"}, "dropout"),
    ("lora", {"qkv_parts": "qx"}, "qkv_parts must be a non-empty subset of 'qkv'"),
    ("lora", {"qkv_parts": "qq"}, "qkv_parts must be a non-empty subset of 'qkv'"),
    ("lora", {"qkv_parts": ""}, "qkv_parts must be a non-empty subset of 'qkv'"),
    ("ssf", {"init_std": -1}, "init_std must be a number in [0, 1]"),
]


@pytest.mark.parametrize("method, cfg, phrase", BAD_CONFIGS,
                         ids=[f"{m}-{k}={v!r}" for m, cfg, _ in BAD_CONFIGS for k, v in cfg.items()])
def test_bad_config_value(method, cfg, phrase):
    model = fresh("vit")
    fails(model, ConfigError, f"{method}:", phrase, method=method, **cfg)
    with pytest.raises(ConfigError):  # the same check without a model
        pv.config(method, **cfg)


@pytest.mark.parametrize("method, cfg, valid", [
    ("lora", {"rank": 4}, ["r", "alpha", "dropout", "targets", "qkv_parts"]),
    ("ssf", {"std": 0.1}, ["init_std", "targets"]),
    ("bias", {"r": 4}, ["targets"]),
])
def test_unknown_option_lists_valid_options(method, cfg, valid):
    message = fails(fresh("vit"), ConfigError, f"unknown option(s) {next(iter(cfg))}",
                    "valid options:", method=method, **cfg)
    for option in valid:
        assert option in message.partition("valid options:")[2]


def test_options_with_several_methods_are_ambiguous():
    fails(fresh("vit"), ConfigError, "ambiguous", "peftvision.config(", method=["lora", "bias"], r=4)


def test_method_listed_twice():
    fails(fresh("vit"), ConfigError, "listed twice", method=["bias", "bitfit"])


def test_no_method():
    fails(fresh("vit"), ConfigError, "at least one method", method=[])


def test_options_beside_a_config_object():
    fails(fresh("vit"), ConfigError, "set them on the config", method=pv.config("lora"), r=4)


# ---- targets --------------------------------------------------------------------------------

def test_targets_matching_nothing_list_example_modules():
    message = fails(fresh("vit"), TargetError, "['nope']", "patch_embed.proj", "blocks.0.attn.qkv",
                    "targets=[", method="lora", targets=["nope"])
    assert "VisionTransformer" in message


def test_regex_targets_matching_nothing():
    fails(fresh("resnet"), TargetError, "layer9", "conv1", method="ssf", targets=r"layer9\..*")


def test_targets_of_the_wrong_module_type():
    # the names exist, but they are norms, which LoRA cannot adapt
    fails(fresh("vit"), TargetError, "Linear/Conv", "blocks.0.attn.qkv",
          method="lora", targets=["norm1"])


def test_targets_of_a_bad_kind_in_a_list():
    fails(fresh("vit"), TargetError, "targets must be", method="lora", targets=["qkv", 3])


def test_targets_not_a_spec_at_all():
    # an int is neither a regex, a list of names/types, nor None: say so, don't TypeError
    fails(fresh("vit"), (TargetError, ConfigError), "targets", method="lora", targets=3)


@pytest.mark.parametrize("method", ["lora", "ssf", "attention"])
def test_generic_model_needs_explicit_targets(method):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    fails(model, UnsupportedArchitectureError, "targets=[", method=method)


def test_linear_probe_needs_a_head():
    fails(nn.Sequential(nn.Linear(4, 4)), UnsupportedArchitectureError, "classifier head",
          method="linear")


# ---- architectures --------------------------------------------------------------------------

@pytest.mark.parametrize("arch, method, cls", [
    ("unet", "linear", "UNet2DConditionModel"),
    ("resnet", "layernorm", "ResNet"),
    ("resnet", "attention", "ResNet"),
    ("vit", "batchnorm", "VisionTransformer"),
    ("unet", "vpt", "UNet2DConditionModel"),
])
def test_method_not_supported_by_the_architecture(arch, method, cls):
    supported = pv.methods()[method].architectures
    assert arch not in supported
    fails(fresh(arch), UnsupportedArchitectureError, f"'{method}' does not support {cls}",
          f"it supports: {', '.join(supported)}", method=method)


# ---- rollback of a multi-method apply ------------------------------------------------------

def test_failure_in_the_middle_of_a_multi_method_apply_rolls_back_everything():
    # lora wraps the ResNet's block convs, then attention (no placement on ResNets) refuses it
    fails(fresh("resnet"), UnsupportedArchitectureError, "'attention' does not support ResNet",
          method=["bias", "lora", "attention"])


def test_failure_in_a_later_method_rolls_back_earlier_wrappers_vit():
    fails(fresh("vit"), TargetError, "ssf", "['nope']",
          method=["bias", pv.config("lora", r=2), pv.config("ssf", targets=["nope"])])


def test_failure_while_wrapping_rolls_back_earlier_wrappers_of_the_same_method():
    # "a" is wrapped first; "qkv" cannot be split in thirds, which the wrapper finds out
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.qkv = nn.Linear(4, 5)

    model = Block()
    model.a.bias.requires_grad_(False)
    fails(model, ConfigError, "divisible by 3", method="lora", targets=["a", "qkv"], qkv_parts="qv")


def test_failure_on_a_model_with_methods_applied_keeps_the_earlier_methods():
    model = pv.apply(fresh("resnet"), "bias")
    message = fails(model, UnsupportedArchitectureError, "attention", method=["lora", "attention"])
    assert "ResNet" in message
    assert pv.applied(model).names == ("bias",)


# ---- apply / merge state errors -------------------------------------------------------------

@pytest.mark.parametrize("first, again", [("lora", "lora"), ("bias", "bitfit"), ("ssf", ["bias", "ssf"])])
def test_apply_the_same_method_twice(first, again):
    model = pv.apply(fresh("vit"), first)
    fails(model, ConfigError, "already applied", method=again)


def test_apply_on_a_merged_model():
    model = pv.apply(fresh("vit"), "lora", r=2)
    pv.merge(model)
    fails(model, MergeError, "merged", "peftvision.unmerge(model)", method="bias")


def test_merge_twice_warns_and_does_nothing():
    model = pv.apply(fresh("vit"), "lora", r=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdapterLayer):
                m.lora_B.normal_()
    model.eval()
    pv.merge(model)
    inputs = make_inputs("vit")
    with torch.no_grad():
        out = run(model, inputs)
    snap = Snapshot(model)
    with pytest.warns(UserWarning, match="already merged"):
        pv.merge(model)
    snap.assert_unchanged(model)
    with torch.no_grad():
        assert torch.equal(run(model, inputs), out)


def test_failed_merge_leaves_the_model_unmerged():
    # SSF after an affine-free LayerNorm has no weight to fold into: merge must refuse *before*
    # folding the other SSF layers, not leave the model half merged.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 4))
    pv.apply(model, "ssf", targets=["0", "1"])
    fails(model, MergeError, "no weight", call=lambda: pv.merge(model))


@pytest.mark.parametrize("action", ["merge", "unmerge", "unload", "save_adapter"])
def test_actions_on_a_model_with_nothing_applied(action, tmp_path):
    model = fresh("vit")
    out = tmp_path / "adapter"
    call = {"save_adapter": lambda: pv.save_adapter(model, out)}.get(
        action, lambda: getattr(pv, action)(model))
    # a peftvision error (errors.py: the base class of every error it raises on purpose),
    # and still a ValueError for callers catching that
    fails(model, (PeftVisionError, ValueError), "no peftvision method was applied",
          "peftvision.apply(model", call=call)
    assert not out.exists()
    with pytest.raises(PeftVisionError):
        call()


@pytest.mark.parametrize("methods", [["linear", "lora"], ["full", "bias"], ["bias", "linear"]])
def test_standalone_methods_do_not_combine(methods):
    fails(fresh("vit"), ConfigError, "cannot be combined", method=methods)


def test_standalone_method_after_another_apply():
    model = pv.apply(fresh("vit"), "lora")
    with pytest.raises(ConfigError, match="cannot be combined"):
        pv.apply(model, "full")
