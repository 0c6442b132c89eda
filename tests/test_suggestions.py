"""Helpful errors: "did you mean" for method names and options, peft's option spellings."""

import pytest

import peftvision as pv


@pytest.mark.parametrize("typo, meant", [("loar", "'lora'"), ("bitfti", "'bitfit'"), ("ssff", "'ssf'")])
def test_unknown_method_suggests_the_close_name(typo, meant):
    with pytest.raises(pv.UnknownMethodError) as info:
        pv.config(typo)
    assert f"did you mean {meant}" in str(info.value)


def test_unknown_method_far_from_any_name_suggests_nothing():
    with pytest.raises(pv.UnknownMethodError) as info:
        pv.config("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "available methods" in str(info.value)


@pytest.mark.parametrize("peft_name, ours", [("lora_alpha", "alpha"), ("target_modules", "targets"),
                                             ("lora_dropout", "dropout"), ("rank", "r")])
def test_peft_spellings_name_ours(peft_name, ours):
    with pytest.raises(pv.ConfigError) as info:
        pv.config("lora", **{peft_name: 1})
    assert f"{peft_name}: peft's name for '{ours}'" in str(info.value)


def test_misspelt_option_suggests_the_close_option():
    with pytest.raises(pv.ConfigError) as info:
        pv.config("lora", dropuot=0.1)
    message = str(info.value)
    assert "dropuot: did you mean 'dropout'?" in message
    assert message.endswith("valid options: alpha, dropout, qkv_parts, r, targets")


def test_peft_hint_only_where_the_option_exists():
    # ssf has no alpha: pointing at it would send the user to another error
    with pytest.raises(pv.ConfigError) as info:
        pv.config("ssf", lora_alpha=8)
    assert "peft's name" not in str(info.value)
