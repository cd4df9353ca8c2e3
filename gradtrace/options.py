"""What a traced run records, declared once.

Each field of `RunOptions` carries its name, type, default and help. `gradtrace run`'s
options are generated from them, `gradtrace.trace()` / `start()` and `Session` take them as
keywords, and `to_argv()` gives each torchrun rank the same options back on its command line,
so an option cannot be known to one front end and lost in another.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from gradtrace.errors import GradtraceError
from gradtrace.probes.timeline import DEFAULT_TRACE_STEPS, TraceSteps

# "light": module stack, step counter and the saved-tensor check (names the corrupted tensor,
# who saved it and where). "full": adds the write log, which names the line that wrote.
LEVELS = ("light", "full")
DEFAULT_LEVEL = "full"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flag:
    """How one field reads on `gradtrace run`'s command line: `--<field-name>`.

    A bool field is a switch that is off by default; any other field takes one value, shown
    with its default in `--help`. `minimum` bounds an int field on the command line and in
    the API alike; `choices` limits a str field.
    """

    help: str
    metavar: str | None = None
    minimum: int | None = None
    choices: tuple[str, ...] | None = None

    def option_name(self, name: str) -> str:
        return "--" + name.replace("_", "-")

    def decorators(self, name: str, default: Any) -> list[Callable[[F], F]]:
        """The click options of this field, in the order `--help` lists them."""
        if isinstance(default, bool):
            return [click.option(self.option_name(name), name, is_flag=True, help=self.help)]
        if self.choices is not None:
            kind: click.ParamType | None = click.Choice(self.choices)
        elif self.minimum is not None:
            kind = click.IntRange(min=self.minimum)
        else:
            kind = None
        option = click.option(
            self.option_name(name),
            name,
            type=kind,
            default=default,
            show_default=True,
            metavar=self.metavar,
            help=self.help,
        )
        return [option]

    def read(self, name: str, values: Mapping[str, Any]) -> Any:
        """The field's value from click's parsed parameters."""
        return values[name]

    def argv(self, name: str, value: Any) -> list[str]:
        """Command-line words that give this field `value` back."""
        if isinstance(value, bool):
            return [self.option_name(name)] if value else []
        return [self.option_name(name), str(value)]

    def check(self, name: str, value: Any, default: Any) -> None:
        """Refuse a value the command line would refuse (GradtraceError, exit 2)."""
        if isinstance(default, bool) and not isinstance(value, bool):
            raise GradtraceError(f"{name} must be True or False, not {value!r}.")
        if self.choices is not None and value not in self.choices:
            raise GradtraceError(
                f"Unknown {name} '{value}'; choose one of {', '.join(self.choices)}."
            )
        if self.minimum is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= self.minimum
        ):
            raise GradtraceError(f"{name} must be an integer >= {self.minimum}, not {value!r}.")

    def describe(self, name: str, default: Any) -> str:
        """The field as the API's docstrings list it."""
        return _item(f"`{name}` ({self.option_name(name)}, default {default}): {self.help}")


@dataclass(frozen=True)
class TensorBoardFlags(Flag):
    """`tensorboard`: a switch into the run directory, or a logdir of the user's.

    On the command line these are two options (`--tensorboard`, `--tensorboard-logdir DIR`,
    which implies the first); in the API one value: True, or the logdir's path.
    """

    logdir_help: str = ""

    def decorators(self, name: str, default: Any) -> list[Callable[[F], F]]:
        return [
            click.option(self.option_name(name), name, is_flag=True, help=self.help),
            click.option(
                self.option_name(name) + "-logdir",
                name + "_logdir",
                type=click.Path(file_okay=False, path_type=Path),
                help=self.logdir_help,
            ),
        ]

    def read(self, name: str, values: Mapping[str, Any]) -> Any:
        return values[name + "_logdir"] or values[name]

    def argv(self, name: str, value: Any) -> list[str]:
        if isinstance(value, Path):
            return [self.option_name(name) + "-logdir", str(value)]
        return super().argv(name, value)

    def check(self, name: str, value: Any, default: Any) -> None:
        if not isinstance(value, bool | Path):
            raise GradtraceError(f"{name} must be True, False or a logdir path, not {value!r}.")

    def describe(self, name: str, default: Any) -> str:
        flag = self.option_name(name)
        return _item(
            f"`{name}` ({flag}, {flag}-logdir, default {default}): write TensorBoard events "
            "while training: True into RUN_DIR/tensorboard, a path into that logdir as the "
            "sub-run gradtrace/<run name>."
        )


def _item(text: str) -> str:
    return textwrap.fill(
        text, width=88, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False
    )


def _declared(flag: Flag) -> dict[str, Flag]:
    """A field's metadata: how `gradtrace run` spells it and what its help says."""
    return {"flag": flag}


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a traced run records. Every field is an option of `gradtrace run` (`--every`) and
    a keyword of `gradtrace.trace()` / `start()` (`every=`), with the same default."""

    level: str = field(
        default=DEFAULT_LEVEL,
        metadata=_declared(
            Flag(
                "light: check saved tensors only; full: also log writes to name the culprit line.",
                choices=LEVELS,
            )
        ),
    )
    every: int = field(
        default=1,
        metadata=_declared(Flag("Record gradient statistics every N optimizer steps.", minimum=1)),
    )
    update_ratio: bool = field(
        default=False,
        metadata=_declared(
            Flag(
                "Also record ‖Δp‖/‖p‖ per parameter; costs a device copy of the stepped "
                "parameters during each recorded optimizer.step()."
            )
        ),
    )
    grad_histograms: int = field(
        default=0,
        metadata=_declared(
            Flag(
                "Also count every gradient's values into fixed bins every N optimizer steps "
                "(TensorBoard histograms grad_values/...); 0: never.",
                metavar="N",
                minimum=0,
            )
        ),
    )
    # "0-2,10", "none", or step indices; always a TraceSteps once constructed.
    trace_steps: str | Iterable[int] | TraceSteps = field(
        default=DEFAULT_TRACE_STEPS,
        metadata=_declared(
            Flag(
                "Optimizer steps whose module spans and in-place writes go into trace.json: "
                "steps and ranges such as 0-2,10, or none.",
                metavar="STEPS",
            )
        ),
    )
    # True: into the run directory; a path: into that TensorBoard logdir.
    tensorboard: bool | str | Path = field(
        default=False,
        metadata=_declared(
            TensorBoardFlags(
                "Write TensorBoard events while training, into RUN_DIR/tensorboard.",
                logdir_help="Write TensorBoard events while training into this logdir, as the "
                "sub-run gradtrace/<run name> (implies --tensorboard).",
            )
        ),
    )
    check_ranks: bool = field(
        default=False,
        metadata=_declared(
            Flag(
                "Distributed: compare every parameter's gradient and value norms across ranks at "
                "each recorded step (one small all_reduce per recorded step)."
            )
        ),
    )

    def __post_init__(self) -> None:
        # Normalised here, so that a bad value fails where it is written, not when tracing
        # starts: a trace-steps spec is parsed, a logdir given as str becomes a Path.
        object.__setattr__(self, "trace_steps", TraceSteps.parse(self.trace_steps))
        if isinstance(self.tensorboard, str):
            object.__setattr__(self, "tensorboard", Path(self.tensorboard))
        for item in dataclasses.fields(self):
            _flag(item).check(item.name, getattr(self, item.name), item.default)

    @classmethod
    def of(cls, base: RunOptions | None = None, /, **values: Any) -> RunOptions:
        """`base` (default: every default) with `values` replacing its fields.

        An unknown name is a TypeError, as for any misspelt keyword argument.
        """
        unknown = values.keys() - {item.name for item in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(
                f"Unknown trace option(s): {', '.join(sorted(unknown))}. "
                f"The options are: {', '.join(item.name for item in dataclasses.fields(cls))}."
            )
        return dataclasses.replace(cls() if base is None else base, **values)

    @classmethod
    def click_options(cls, command: F) -> F:
        """Decorate a click command with one option per field (parsed back by `from_cli`)."""
        for item in reversed(dataclasses.fields(cls)):
            for decorator in reversed(_flag(item).decorators(item.name, item.default)):
                command = decorator(command)
        return command

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> RunOptions:
        """The options from click's parsed parameters (those `click_options` declared)."""
        fields = dataclasses.fields(cls)
        return cls(**{item.name: _flag(item).read(item.name, values) for item in fields})

    def to_argv(self) -> list[str]:
        """These options as `gradtrace run` arguments (what each torchrun rank is started with)."""
        words: list[str] = []
        for item in dataclasses.fields(self):
            words += _flag(item).argv(item.name, getattr(self, item.name))
        return words

    @classmethod
    def describe(cls) -> str:
        """One line per option (keyword, command-line option, default, help), for docstrings."""
        return "\n".join(
            _flag(item).describe(item.name, item.default) for item in dataclasses.fields(cls)
        )


def _flag(item: dataclasses.Field[Any]) -> Flag:
    return item.metadata["flag"]
