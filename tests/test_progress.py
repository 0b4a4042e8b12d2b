"""Progress bars: shown on a terminal, silent with --quiet and when stderr is not a terminal.

Oracles: what reaches stderr (captured by pytest), rich's own "one live display at a time" rule (a second
Progress started inside the first raises rich.errors.LiveError), and the command line's exit code.
"""

import re

import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from compressor.cli import app, main
from compressor.train import train
from compressor.utils import progress as bars


@pytest.fixture(autouse=True)
def loud():
    bars.set_quiet(False)
    yield
    bars.set_quiet(False)


def tiny_training(steps=3, after_step=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ds = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    return train(model, ds, steps=steps, batch_size=4, lr=0.01, description="training-bar", after_step=after_step)


def test_bar_on_a_terminal_and_quiet(monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    monkeypatch.delenv("COMPRESSOR_QUIET", raising=False)
    assert bars.enabled()
    seen = []

    def state(model, step):  # the bar as the loop left it after step - 1 (rendering itself runs on a timer)
        task = bars._live.tasks[0]
        seen.append((task.completed, task.description))

    tiny_training(after_step=state)
    assert "training-bar" in capsys.readouterr().err
    assert [c for c, _ in seen] == [0, 1, 2] and re.search(r"loss \d\.\d", seen[-1][1])  # a step's loss, not nan
    bars.set_quiet(True)
    tiny_training()
    assert capsys.readouterr().err == ""
    bars.set_quiet(False)
    monkeypatch.setenv("COMPRESSOR_QUIET", "1")
    tiny_training()
    assert capsys.readouterr().err == ""


def test_no_bar_when_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("COMPRESSOR_QUIET", raising=False)
    assert not bars.enabled()  # pytest's captured stderr is not a terminal
    tiny_training()
    assert capsys.readouterr().err == ""


def test_nested_bars_share_one_display(monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")
    with bars.progress("outer", total=2) as outer:
        with bars.progress("inner-step"):  # would raise LiveError as a second rich Progress
            tiny_training(steps=2)
        outer.advance()
        outer.update(description="outer renamed", total=3, loss=0.5)
    assert list(bars.track(range(3), "tracked")) == [0, 1, 2]
    assert bars._live is None and bars._users == 0  # the display is closed once the last bar ends
    assert "inner-step" in capsys.readouterr().err


def test_step_decorator(monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")

    @bars.step("long-step")
    def work(x, y=1):
        return x + y

    assert work(2, y=3) == 5
    assert "long-step" in capsys.readouterr().err


def test_quiet_flag_anywhere_on_the_command_line(capsys):
    r = CliRunner().invoke(app, ["--quiet", "methods"])
    assert r.exit_code == 0 and bars._quiet
    bars.set_quiet(False)
    main(["methods", "--quiet"])  # after the command name: main moves it before
    assert bars._quiet
    bars.set_quiet(False)
    main(["-q", "recipes", "list"])
    assert bars._quiet
    with pytest.raises(SystemExit) as e:  # an unknown option is still refused
        main(["methods", "--loud"])
    assert e.value.code == 2


def test_log_lines_when_not_a_terminal_and_a_step_runs_long(monkeypatch, capsys):
    """In a log, a step longer than HEARTBEAT_S prints its state as plain lines (count, elapsed, time left); a quick
    step prints nothing, and --quiet silences the lines too."""
    import time

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("COMPRESSOR_QUIET", raising=False)
    monkeypatch.setattr(bars, "HEARTBEAT_S", 0.1)
    with bars.progress("sweep", total=4) as bar:
        bar.advance()
        bar.update(description="sweep omp-global @ 40%")
        time.sleep(0.35)
    err = capsys.readouterr().err
    assert re.search(r"sweep omp-global @ 40%: 1/4, \d+s elapsed, about \d+s left", err), err
    with bars.progress("quick", total=2) as bar:
        bar.advance(2)
    time.sleep(0.25)  # the heartbeat has stopped with its last step
    assert capsys.readouterr().err == ""
    bars.set_quiet(True)
    with bars.progress("silent", total=2):
        time.sleep(0.3)
    assert capsys.readouterr().err == ""
    assert not bars._log_bars and bars._beat is None
