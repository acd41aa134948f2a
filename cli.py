"""One way to declare, parse and validate a script's config dataclass (shared by every rung's script).

Declare each field with `opt` (default, help string, and optionally choices, a check and an
environment variable that overrides the default); `parse` turns argv into an instance:

    @dataclass
    class Config:
        preset: str = opt("default", "named settings applied before the flags", choices=("default", "smoke"))
        lr: float = opt(1e-3, "learning rate", check=POSITIVE)
        cache_dir: str = opt("~/.cache/x", "cache folder ($X_CACHE)", env="X_CACHE")
        plot: bool = opt(False, "also write a figure")        # --plot (a True default gets --no-plot too)

        def __post_init__(self):
            validate(self)                                     # Config(lr=-1) raises UsageError too

    cfg = parse(Config, sys.argv[1:], prog="x.py", presets={"default": {}, "smoke": dict(lr=1e-2)})

Order: field defaults (or $env) → the deltas of the `--preset` named → the flags given. Every bad value
is one line `prog: error: <flag>: <what is accepted>` on stderr and exit status 2 (argparse's own type
and choice errors included). Fields are int, float, str or bool; `--help` lists them with defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

Check = Tuple[Callable[[Any], bool], str]  # (predicate, what is accepted)
POSITIVE: Check = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
FRACTION: Check = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
OPEN_UNIT: Check = (lambda v: 0 < v < 1, "must be in (0, 1)")
TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class UsageError(ValueError):
    """A bad flag value or a missing input: reported as one line, exit status 2."""


def opt(default: Any = None, help: str = "", choices: Optional[Sequence] = None, check: Optional[Check] = None,
        env: Optional[str] = None):
    """A config field: its default (replaced by $env when that variable is set), help string, allowed
    choices and a (predicate, message) check, which `validate` and `parse` enforce."""
    meta = dict(help=help, choices=None if choices is None else tuple(choices), check=check, env=env)
    if env is None:
        return dataclasses.field(default=default, metadata=meta)
    return dataclasses.field(default_factory=lambda: _from_env(env, default), metadata=meta)


def _from_env(env: str, default: Any) -> Any:
    """$env converted to the default's type (bool: 1/true/yes), or the default when unset or empty."""
    text = os.environ.get(env, "")
    if not text or default is None or isinstance(default, str):
        return text or default
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    try:
        return type(default)(text)
    except ValueError:
        raise UsageError(f"${env}: must be a {type(default).__name__} (got {text!r})") from None


def flag(name: str) -> str:
    """Field name → its flag: learning_rate → --learning-rate."""
    return "--" + name.replace("_", "-")


def validate(cfg: Any) -> Any:
    """Check every field's choices and check; raise UsageError('--flag: ...') at the first bad one.
    Returns cfg, so that `validate(Config(...))` reads as one expression."""
    for f in dataclasses.fields(cfg):
        value, check, choices = getattr(cfg, f.name), f.metadata.get("check"), f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise UsageError(f"{flag(f.name)}: must be one of {', '.join(map(str, choices))} (got {value!r})")
        if check is not None and not check[0](value):
            raise UsageError(f"{flag(f.name)}: {check[1]} (got {value!r})")
    return cfg


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block): `prog: error: ...`, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(cls: type, prog: str, description: Optional[str] = None,
                 suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per field of dataclass `cls`. With suppress_defaults, parse_args returns only the flags given."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           argument_default=argparse.SUPPRESS if suppress_defaults else None)
    defaults = None if suppress_defaults else cls()
    for f in dataclasses.fields(cls):
        kwargs = dict(help=f.metadata.get("help", ""), dest=f.name)
        if defaults is not None:
            kwargs["default"] = getattr(defaults, f.name)
        kind = TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        if kind is bool:  # --flag sets True; a field whose default is True also gets --no-flag
            true_default = f.default is True
            action = argparse.BooleanOptionalAction if true_default else "store_true"
            parser.add_argument(flag(f.name), action=action, **kwargs)
        else:
            parser.add_argument(flag(f.name), type=kind, choices=f.metadata.get("choices"), **kwargs)
    return parser


def given_flags(cls: type, argv: Optional[Sequence[str]], prog: str, description: Optional[str] = None) -> Dict:
    """{field: value} of only the flags given in argv. --help, unknown flags, type and choice errors
    exit here (one line, status 2) — use this to merge other sources (a resumed run's saved config)."""
    build_parser(cls, prog, description).parse_args(argv)  # --help (with the defaults) and errors
    return vars(build_parser(cls, prog, description, suppress_defaults=True).parse_args(argv))


def with_preset(cls: type, presets: Mapping[str, Mapping], given: Mapping) -> Dict:
    """Field values: defaults, then the deltas of preset given['preset'] (else the `preset` field's
    default), then `given`. A preset naming an unknown field is a UsageError."""
    values = dataclasses.asdict(cls())
    name = given.get("preset", values.get("preset"))
    if name not in presets:
        raise UsageError(f"--preset: must be one of {', '.join(presets)} (got {name!r})")
    unknown = set(presets[name]) - set(values)
    if unknown:
        raise UsageError(f"--preset {name}: sets unknown fields {', '.join(sorted(unknown))}")
    return {**values, **presets[name], **given}


def refuse_fixed(values: Mapping, given: Mapping) -> None:
    """A flag given with another value than the one its --method fixes (the registry's loss_overrides,
    baselines.fixed_fields) is a UsageError naming both, e.g. --method no-flow with --flow-target adjoint."""
    if "method" in values:
        from baselines import fixed_fields  # torch only where a config has a --method
        for method, name, value in fixed_fields(str(values["method"])):
            if name in given and given[name] != value:
                raise UsageError(f"{flag(name)} {given[name]}: --method {method} fixes it to {value}")


def parse(cls: type, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
          presets: Optional[Mapping[str, Mapping]] = None, description: Optional[str] = None) -> Any:
    """argv → a validated instance of `cls`: defaults → preset deltas → flags given. A bad value
    (argparse's errors, `validate`'s, __post_init__'s UsageError/ValueError) exits with one line."""
    parser = OneLineParser(prog=prog)
    try:
        given = given_flags(cls, argv, parser.prog, description)
        values = with_preset(cls, presets, given) if presets else {**dataclasses.asdict(cls()), **given}
        refuse_fixed(values, given)
        return validate(cls(**values))
    except ValueError as err:  # UsageError included
        parser.error(str(err))
