"""Progress bars on long work: shown on a terminal or when forced, hidden otherwise or when asked."""

import io
import sys

import pytest
import torch

import peftvision as pv
from peftvision.progress import ENV, enabled, progress
from tests.models import tiny_vit


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_terminal(monkeypatch) -> FakeTerminal:
    """stderr as an interactive terminal. Called in the test body: pytest re-installs its own
    capture of sys.stderr between a fixture's setup and the test."""
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv(ENV, raising=False)
    return stream


def test_bar_on_a_terminal(monkeypatch):
    terminal = fake_terminal(monkeypatch)
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert "counting" in terminal.getvalue() and "/3" in terminal.getvalue()


@pytest.mark.parametrize("value", ["0", "off"])
def test_env_silences_a_terminal(monkeypatch, value):
    terminal = fake_terminal(monkeypatch)
    monkeypatch.setenv(ENV, value)
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_quiet_argument_silences_a_terminal(monkeypatch):
    terminal = fake_terminal(monkeypatch)
    assert list(progress(range(3), "counting", quiet=True)) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_no_bar_without_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert not enabled()  # pytest's captured stderr is not a terminal
    assert list(progress(iter(range(3)), "counting")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_env_forces_a_bar_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    list(progress(range(2), "counting"))
    assert "counting" in capsys.readouterr().err


def test_stopping_early_closes_the_bar(monkeypatch):
    terminal = fake_terminal(monkeypatch)
    for i in progress(range(10), "early"):
        if i == 2:
            break
    shown = terminal.getvalue()
    assert "early" in shown and shown.endswith("\r")  # closed: the line is wiped (leave=False)


def test_svdiff_shows_its_svds(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    pv.apply(tiny_vit(), "svdiff")
    assert "svdiff: SVD of weights" in capsys.readouterr().err
    monkeypatch.setenv(ENV, "0")
    pv.apply(tiny_vit(), "svdiff")
    assert capsys.readouterr().err == ""


def test_shpeft_shows_its_importance_pass(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    torch.manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(3)]
    pv.apply(tiny_vit(), "shpeft", data=data, fraction=0.01)
    err = capsys.readouterr().err
    assert "shpeft: importance" in err and "/3 " in err  # the pass's length is known
