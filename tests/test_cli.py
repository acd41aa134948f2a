"""Tests of cli.py, the shared config parser: one-line errors, preset order, env defaults, validation."""

from dataclasses import dataclass

import pytest

import cli
from cli import FRACTION, POSITIVE, UsageError, opt


@dataclass
class Toy:
    preset: str = opt("base", "named settings", choices=("base", "fast", "broken"))
    lr: float = opt(1e-3, "learning rate", check=POSITIVE)
    steps: int = opt(100, "steps", check=POSITIVE)
    mix: float = opt(0.5, "mixing fraction", check=FRACTION)
    method: str = opt("a", "method", choices=("a", "b"))
    cache: str = opt("~/.cache/toy", "cache folder ($TOY_CACHE)", env="TOY_CACHE")
    workers: int = opt(2, "workers ($TOY_WORKERS)", env="TOY_WORKERS")
    plot: bool = opt(False, "also plot")
    bars: bool = opt(True, "progress bars")

    def __post_init__(self):
        cli.validate(self)


PRESETS = {"base": {}, "fast": dict(lr=1e-2, steps=10), "broken": dict(nope=1)}


def parse(*argv):
    return cli.parse(Toy, list(argv), prog="toy.py", presets=PRESETS)


def one_line_exit(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("toy.py: error: "), err
    return err[0]


def test_defaults_and_flags():
    assert parse() == Toy()
    cfg = parse("--lr", "0.1", "--method", "b", "--plot", "--no-bars")
    assert (cfg.lr, cfg.method, cfg.plot, cfg.bars, cfg.steps) == (0.1, "b", True, False, 100)


def test_preset_deltas_apply_before_the_flags_given():
    assert (parse("--preset", "fast").lr, parse("--preset", "fast").steps) == (1e-2, 10)
    cfg = parse("--steps", "7", "--preset", "fast")  # a flag wins over the preset wherever it stands
    assert (cfg.preset, cfg.lr, cfg.steps) == ("fast", 1e-2, 7)


@pytest.mark.parametrize("argv, names", [
    (["--lr", "-1"], ["--lr: must be > 0", "-1.0"]),
    (["--mix", "1.5"], ["--mix: must be in [0, 1]"]),
    (["--method", "c"], ["--method", "invalid choice", "'a', 'b'"]),
    (["--steps", "two"], ["--steps", "invalid int value"]),
    (["--nope"], ["unrecognized arguments: --nope"]),
    (["--preset", "broken"], ["--preset broken", "unknown fields nope"]),
])
def test_every_bad_value_is_one_line_and_exit_2(argv, names, capsys):
    line = one_line_exit(capsys, *argv)
    assert all(name in line for name in names), line


def test_env_defaults_are_typed_and_flags_override_them(monkeypatch, capsys):
    monkeypatch.setenv("TOY_CACHE", "/data/cache")
    monkeypatch.setenv("TOY_WORKERS", "8")
    assert (parse().cache, parse().workers) == ("/data/cache", 8)
    assert parse("--workers", "3").workers == 3
    monkeypatch.setenv("TOY_WORKERS", "many")
    line = one_line_exit(capsys)
    assert "$TOY_WORKERS" in line and "int" in line


def test_validate_from_python_raises_the_same_one_line_message():
    with pytest.raises(UsageError, match=r"^--lr: must be > 0 \(got -1\)$"):
        Toy(lr=-1)
    with pytest.raises(ValueError, match="--method: must be one of a, b"):  # UsageError is a ValueError
        Toy(method="c")
    cfg = Toy()
    cfg.mix = 2.0  # a field set after construction is caught by an explicit validate
    with pytest.raises(UsageError, match=r"--mix: must be in \[0, 1\]"):
        cli.validate(cfg)


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--help")
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--lr LR learning rate (default: 0.001)", "--no-bars", "--plot also plot", "$TOY_CACHE"):
        assert text in out, text


def test_flag_names():
    assert cli.flag("transitions_per_update") == "--transitions-per-update"
