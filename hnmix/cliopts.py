"""Command-line options generated from the settings models: one definition per setting (hnmix.core.settings).

`settings_command(app, cls, run, ...)` adds a typer command whose options are cls's fields: field path ->
flag (`--field-name`, `--section-field`, or the flags declared on the field), bool -> `--x/--no-x`,
Literal -> choices, lists -> comma-separated values, description -> help (with the default), panel ->
a help section. Plus `--config FILE.yaml` and `--set key=value`. The command loads and validates the
settings once (errors name the flag the user typed) and hands them to `run`.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
import types
import typing
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from typer.core import TyperCommand

from hnmix.core.settings import field_extra, known_paths, load_settings, switch_flags
from hnmix.errors import HnmixError

err_console = Console(stderr=True)
USAGE_ERROR = typer.BadParameter.__mro__[1]  # click's UsageError (typer ships its own click): bad flag or value
OTHER = "Other options"


@contextlib.contextmanager
def user_errors():
    """Problems the user can fix end the command with one red line and exit code 2, never a traceback."""
    try:
        yield
    except HnmixError as e:
        code = getattr(e, "exit_code", 2)  # a signal's code when a run stopped cleanly on Ctrl-C / SIGTERM
        err_console.print(f"[bold red]error:[/] {e}" if code == 2 else f"[bold yellow]stopped:[/] {e}",
                          highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(code) from None
    except OSError as e:  # e.g. an --output path under an existing file, a full disk, no permission
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"[bold red]error:[/] {e.strerror or e}{where}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


class SettingsCommand(TyperCommand):
    """typer's plain help, with the options in sections by their rich_help_panel (typer's plain help has
    one section; its rich help squeezes the text column to a few words at 80 columns and prints <str>),
    wrapped without splitting words. Remembers the raw arguments, so that errors name the alias typed."""

    def parse_args(self, ctx, args):
        ctx.meta["hnmix_args"] = list(args)
        try:
            return super().parse_args(ctx, args)
        except USAGE_ERROR as e:  # a bad flag or value: one line, as every other user error
            err_console.print(f"[bold red]error:[/] {e.format_message()} (hnmix {ctx.info_name} --help lists the "
                              "options)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    def collect_usage_pieces(self, ctx) -> list[str]:
        """Usage names the visible arguments only (a hidden catch-all stays out of it)."""
        visible = [p for p in self.get_params(ctx) if not (p.param_type_name == "argument" and p.hidden)]
        return [self.options_metavar, *[piece for p in visible for piece in p.get_usage_pieces(ctx)]]

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = defaultdict(list)
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":  # typer's record would add <str>
                if not param.hidden:
                    sections["Arguments"].append((param.metavar or param.name.upper(), param.help or ""))
            elif (record := param.get_help_record(ctx)) is not None:  # None: hidden
                sections[getattr(param, "rich_help_panel", None) or OTHER].append(record)
        if set(sections) - {"Arguments"} == {OTHER}:
            sections["Options"] = sections.pop(OTHER)
        column = min(max(len(term) for records in sections.values() for term, _ in records) + 2, 32)
        for name in sorted(sections, key=lambda name: (name != "Arguments", name == OTHER)):  # stable: panels
            formatter.write_paragraph()                                                   # in field order
            formatter.write_text(f"{name}:")
            with formatter.indentation():
                write_definitions(formatter, sections[name], column)


def write_definitions(formatter, records: list[tuple[str, str]], column: int) -> None:
    """click's definition list, but words are never split (click splits a path or a --flag-name in a help
    text at its hyphens): the text column wraps at the terminal's width, a longer term has a line of its own."""
    indent = " " * formatter.current_indent
    width = max(formatter.width - formatter.current_indent - column, 20)
    for term, text in records:
        lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]
        first = f"{indent}{term:<{column}}{lines.pop(0)}" if len(term) + 2 <= column else f"{indent}{term}"
        formatter.write("\n".join([first, *(f"{indent}{' ' * column}{line}" for line in lines)]) + "\n")


@dataclass
class Flag:
    """One command-line option: the setting paths it sets and its option strings (`--mlp/--no-mlp`)."""

    name: str  # the python parameter name
    paths: list[tuple[str, ...]]
    decls: list[str]
    field: Any
    panel: str | None
    extra_help: str = ""


def _base_type(annotation):
    """(plain type, is optional) of an annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return annotation, False


def _is_sequence(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _default_text(field_info) -> str:
    if field_info.is_required():
        return " [required]"
    default = field_info.get_default(call_default_factory=True)
    if default is None or (isinstance(default, list | tuple) and not default):
        return ""

    def text(v) -> str:
        return f"{v:.6g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)

    return f" [default: {','.join(map(text, default)) if isinstance(default, list | tuple) else text(default)}]"


def _with_off_switch(f, decls: list[str]) -> list[str]:
    """A boolean setting's first flag becomes its on/off pair (hnmix.core.settings.switch_flags)."""
    if _base_type(f.annotation)[0] is not bool:
        return decls
    on, off = switch_flags(f, decls[0])
    return [f"{on}/{off}" if off else on, *decls[1:]]


def collect_flags(cls) -> list[Flag]:
    """The options of a settings model; a flag declared on several fields (e.g. --N for every method's N)
    becomes one option that sets all of them."""
    fields = {p: f for p, f in known_paths(cls).items() if field_extra(f)["cli"] and not field_extra(f)["argument"]}
    declared = {path: field_extra(f)["flags"] or ["--" + "-".join(path).replace("_", "-")] for path, f in fields.items()}
    sharers: dict[str, list[tuple[str, ...]]] = defaultdict(list)  # option string -> the paths declaring it
    for path, decls in declared.items():
        for d in decls:
            sharers[d.split("/")[0]].append(path)
    flags = []
    for path, f in fields.items():
        panel = field_extra(f)["panel"] or _section_panel(cls, path)
        if own := [d for d in declared[path] if len(sharers[d.split("/")[0]]) == 1]:
            flags.append(Flag("f_" + "__".join(path), [path], _with_off_switch(f, own), f, panel))
        for d in declared[path]:
            paths = sharers[d.split("/")[0]]
            if len(paths) > 1 and paths[0] == path:  # the first field declaring a shared flag adds its option
                flags.append(Flag("f_" + d.strip("-").replace("-", "_") + "__shared", paths, _with_off_switch(f, [d]),
                                  f, panel, f" (sets {', '.join('.'.join(p) for p in paths)})"))
    return flags


def _section_panel(cls, path: tuple[str, ...]) -> str | None:
    """A nested section's fields go to the section's panel (its field's panel, else its description)."""
    if len(path) < 2:
        return None
    section = cls.model_fields[path[0]]
    return field_extra(section)["panel"] or section.description


def option_parameter(flag: Flag) -> inspect.Parameter:
    f, extra = flag.field, field_extra(flag.field)
    tp, _ = _base_type(f.annotation)
    help_text = f"{f.description}{flag.extra_help}{_default_text(f)}"
    kwargs: dict[str, Any] = dict(help=help_text, show_default=False, rich_help_panel=flag.panel)
    if tp is bool:
        annotation = bool | None
    elif typing.get_origin(tp) is Literal:  # pydantic checks the choice: its error names the flag, in one line
        annotation = str | None
        choices = [str(c) for c in typing.get_args(tp)]
        kwargs["metavar"] = extra["metavar"] or "<" + "|".join(choices) + ">"
        if len(kwargs["metavar"]) > 30:  # too long for the option column: the choices go to the help
            kwargs["metavar"] = extra["metavar"] or "CHOICE"
            kwargs["help"] = f"{f.description} (one of: {', '.join(choices)}){flag.extra_help}{_default_text(f)}"
    elif _is_sequence(tp) and typing.get_args(tp)[:1] == (str,):  # paths, KEY=VALUE pairs: repeat the flag
        annotation = list[str] | None
        kwargs["metavar"] = extra["metavar"] or "TEXT"
    elif _is_sequence(tp):  # numbers: comma-separated
        annotation = str | None
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        kwargs["metavar"] = extra["metavar"] or f"{getattr(item, '__name__', 'X').upper()},..."
    else:
        annotation = (tp if tp in (int, float, str) else str) | None
        kwargs["metavar"] = extra["metavar"] or {int: "INT", float: "FLOAT"}.get(tp, "TEXT")
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[annotation, typer.Option(*flag.decls, **kwargs)])


def argument_parameter(name: str, f) -> inspect.Parameter:
    tp, optional = _base_type(f.annotation)
    multiple = typing.get_origin(tp) is list
    annotation = list[str] if multiple else str
    default = None if (optional or multiple or not f.is_required()) else ...
    metavar = field_extra(f)["metavar"]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[
        annotation | None if default is None else annotation,
        typer.Argument(help=f.description, show_default=False, metavar=metavar)])


def typed_flag(flag: Flag, raw_args: list[str]) -> str:
    """The option string the user typed for this flag (the last one, as the parser keeps the last value)."""
    strings = [s for d in flag.decls for s in d.split("/")]
    for arg in reversed(raw_args):
        name = arg.split("=", 1)[0]
        if name in strings:
            return name
    return strings[0]


def parse_value(flag: Flag, value):
    tp, _ = _base_type(flag.field.annotation)
    if isinstance(value, list | tuple) and not value:
        return None  # a repeatable flag not given
    if _is_sequence(tp) and isinstance(value, str):
        return [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]
    return value


ConfigOpt = Annotated[Path | None, typer.Option("--config", metavar="FILE.yaml",
                                                help="YAML file of settings (flags and --set override it)",
                                                rich_help_panel=OTHER)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                  help="override any setting, also nested ones: --set lr=0.06, "
                                                       "--set mochi.s=512 (repeatable; wins over everything)",
                                                  rich_help_panel=OTHER)]


def settings_command(app: typer.Typer, cls, run: Callable[..., Any], *, name: str, help: str,
                     extra: dict[str, tuple[Any, Any]] | None = None, config_file: bool = True) -> None:
    """Add `name` to app: options from cls (+ `extra` params: name -> (annotation, default), passed to run
    as keywords), then `run(settings, **extra_values)`; errors end in one line. With config_file=False the
    command has no --config/--set of its own (a model may then declare those flags for other meanings)."""
    flags = collect_flags(cls)
    arguments = {p[-1]: f for p, f in known_paths(cls).items() if field_extra(f)["argument"]}
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [argument_parameter(n, f) for n, f in arguments.items()]
    params += [option_parameter(f) for f in flags]
    extra = extra or {}
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
               for k, (a, d) in extra.items()]
    if config_file:
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt))
        params.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt))

    def command(ctx: typer.Context, **kwargs):
        raw = ctx.meta.get("hnmix_args", [])
        given: dict[tuple[str, ...], tuple[str, Any]] = {}
        for arg_name in arguments:
            if kwargs.get(arg_name) is not None:
                given[(arg_name,)] = (arg_name, kwargs[arg_name])
        for flag in flags:
            value = parse_value(flag, kwargs.get(flag.name))
            if value is not None:
                for path in flag.paths:
                    given[path] = (typed_flag(flag, raw), value)
        with user_errors():
            settings = load_settings(cls, kwargs.get("config"), given, kwargs.get("set_"))
            return run(settings, **{k: kwargs[k] for k in extra})

    command.__signature__ = inspect.Signature(params)  # typer reads the options off the signature
    app.command(name, cls=SettingsCommand, help=help)(command)


def flags_of(cls) -> set[str]:
    """Every option string a settings command accepts (for docs checks)."""
    return {"--config", "--set"} | {s for flag in collect_flags(cls) for d in flag.decls for s in d.split("/")}


__all__ = ["SettingsCommand", "collect_flags", "flags_of", "settings_command", "user_errors"]
