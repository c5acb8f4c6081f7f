"""The settings machinery every command shares: pydantic models whose fields carry their own flags and help.

A field is declared once, with `setting(...)`: default, description (the `--help` text), and optionally the
flags that set it (default: `--field-name`, or `--section-field-name` inside a nested section), a help
panel, a metavar and its resume policy: `fixed` (part of the experiment: a resumed run may change it only
with `--allow-change`; the default, so a new setting is safe until declared otherwise) or `free` (how the run
is carried out: workers, logging, save cadence). hnmix.cliopts turns a model into command-line options;
`load_settings` merges, in increasing precedence, field defaults < `--config FILE.yaml` < flags < `--set
key=value`, and names the source of every bad value: the flag the user typed, `--set key`, or the config
file's key.
"""

from __future__ import annotations

import difflib
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hnmix.errors import HnmixError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_yaml_dict(self) -> dict:
        return self.model_dump(mode="json")

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_yaml_dict(), sort_keys=False))


RESUME_POLICIES = ("fixed", "free")


def setting(default: Any = ..., description: str = "", *, flags: tuple[str, ...] = (), panel: str | None = None,
            metavar: str | None = None, argument: bool = False, cli: bool = True, resume: str = "fixed",
            **field_kwargs) -> Any:
    """A pydantic Field that also says how the command line sets it and whether a resumed run may change it
    (see the module docstring)."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume policy must be one of {RESUME_POLICIES}, got {resume!r}")
    extra = {"flags": list(flags), "panel": panel, "metavar": metavar, "argument": argument, "cli": cli,
             "resume": resume}
    return Field(default, description=description, json_schema_extra=extra, **field_kwargs)


def field_extra(field) -> dict:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return {"flags": [], "panel": None, "metavar": None, "argument": False, "cli": True, "resume": "fixed", **extra}


# ------------------------------------------------------------------------------------------ loading


def parse_sets(sets: list[str]) -> dict[tuple[str, ...], Any]:
    """`--set key=value` pairs -> {path: value}; `section.key` reaches nested settings; values are YAML
    scalars or lists (`5`, `true`, `[1, 2]`)."""
    out = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HnmixError(f"--set expects key=value, got '{item}'")
        path = tuple(part.strip().replace("-", "_") for part in key.strip().split("."))
        out[path] = yaml.safe_load(raw) if raw.strip() else None
    return out


def section_type(field) -> type[BaseModel] | None:
    """The model of a nested settings section (a field typed as a BaseModel subclass), else None."""
    sub = field.annotation
    return sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None


def flatten(cls: type[BaseModel], values: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: value}, descending into the mappings that are sections of cls (other dicts are values)."""
    out = {}
    for key, value in values.items():
        field = cls.model_fields.get(key)
        sub = section_type(field) if field is not None else None
        if sub is not None and isinstance(value, dict):
            out.update(flatten(sub, value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def known_paths(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every settable path of a model (nested sections flattened) -> its FieldInfo."""
    out = {}
    for name, field in cls.model_fields.items():
        if (sub := section_type(field)) is not None:
            out.update(known_paths(sub, (*prefix, name)))
        else:
            out[(*prefix, name)] = field
    return out


def dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def setting_names(cls: type[BaseModel]) -> list[str]:
    """Every name `--set` accepts: dotted paths (`mochi.s`), whole sections (`augment`), older names."""
    paths = list(known_paths(cls))
    sections = {p[:i] for p in paths for i in range(1, len(p))}
    old = list(cls.renamed()) if hasattr(cls, "renamed") else []
    return [dotted(p) for p in [*paths, *sorted(sections), *old]]


def check_keys(cls: type[BaseModel], values: dict[tuple[str, ...], Any], origin: str) -> None:
    paths = known_paths(cls)
    names = [dotted(p) for p in paths]
    sections = {p[:i] for p in paths for i in range(1, len(p))}
    for path in values:
        if path in paths or path in sections:  # a whole section as one value: its model validates it
            continue
        key = dotted(path)
        close = difflib.get_close_matches(key, names, n=1) or difflib.get_close_matches(
            path[-1], [dotted(p) for p in paths if p[-1] == path[-1]] or names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if hasattr(cls, "unknown_setting_hint") and (special := cls.unknown_setting_hint(key)):
            hint = f" ({special})"
        raise HnmixError(f"{origin}: unknown setting '{key}'{hint}")


def read_yaml_settings(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HnmixError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HnmixError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise HnmixError(f"{path} must hold a mapping of settings")
    return loaded


def load_settings(cls: type[Settings], config_file: str | Path | None = None,
                  flags: dict[tuple[str, ...], tuple[str, Any]] | None = None, sets: list[str] | None = None,
                  values: dict | None = None) -> Settings:
    """Merge defaults < config file < flags < --set (and `values`, programmatic, between file and flags).

    flags maps a path to (the flag the user typed, its value); errors name that flag. A model may define
    `renamed() -> {old path: new path}` (class method): settings renamed since older versions still load,
    with a note saying the new name."""
    renamed = cls.renamed() if hasattr(cls, "renamed") else {}

    def migrate(flat: dict, origin: str) -> dict:
        out = {}
        for path, value in flat.items():
            for new in renamed.get(path, (path,)):
                if new != path and origin != "settings":
                    notify(f"note: {origin}: setting '{dotted(path)}' is now '{dotted(new)}'")
                out[new] = value
        return out
    merged: dict[tuple[str, ...], Any] = {}
    source: dict[tuple[str, ...], str] = {}

    def take(flat: dict, origin: str, label) -> None:
        flat = migrate(flat, origin)
        check_keys(cls, flat, origin)
        for path, value in flat.items():
            merged[path] = value
            source[path] = label(path)

    if config_file is not None:
        take(flatten(cls, read_yaml_settings(config_file)), str(config_file), lambda p: f"{config_file}: {dotted(p)}")
    if values:
        take(flatten(cls, values), "settings", dotted)
    if flags:
        for path, (flag, value) in flags.items():
            merged[path], source[path] = value, flag
    if sets:
        take(parse_sets(sets), "--set", lambda p: f"--set {dotted(p)}")
    try:
        return cls(**nest(merged))
    except ValidationError as e:
        raise HnmixError(format_validation_error(e, source, cls)) from None


def notify(message: str) -> None:
    """A one-line note on stderr (stdout may carry JSON)."""
    print(message, file=sys.stderr)


def migrate_values(cls: type[BaseModel], values: dict) -> dict:
    """Settings saved by an older version (a checkpoint's config) under this version's names, as a dict."""
    renamed = cls.renamed() if hasattr(cls, "renamed") else {}
    flat = {}
    for path, value in flatten(cls, values).items():
        for new in renamed.get(path, (path,)):
            flat[new] = value
    return nest(flat)


def load_config(cls: type[Settings], config_file: str | Path | None = None, overrides: dict | None = None,
                sets: list[str] | None = None) -> Settings:
    """load_settings for code: `overrides` are plain values (None = not given), as a program passes them."""
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    return load_settings(cls, config_file, None, sets, values=values)


def switch_flags(field, decl: str) -> tuple[str, str | None]:
    """(on, off) option strings of a boolean setting's flag: `--x/--no-x` unless declared as a pair
    (`--mochi-naive/--mochi-fused`) or as an off-by-default plain switch (`--profile`: off is None)."""
    on, _, off = decl.partition("/")
    if off or (field_extra(field)["flags"] and field.default is False):
        return on, off or None
    return on, f"--no-{on.removeprefix('--')}"


def canonical_flag(cls: type[BaseModel], path: tuple[str, ...], value: Any = None) -> str | None:
    """The flag that sets path (its --set key if it has none); for a boolean setting and a value, the flag
    that gives that value (mlp=False: `--no-mlp`)."""
    field = known_paths(cls).get(path)
    if field is None:
        return None
    extra = field_extra(field)
    if not extra["cli"] or extra["argument"]:
        return dotted(path)
    on, off = switch_flags(field, extra["flags"][0] if extra["flags"] else "--" + "-".join(path).replace("_", "-"))
    is_switch = field.annotation is bool or bool in typing.get_args(field.annotation)  # bool, bool | None
    return (off or on) if is_switch and value is False else on


@dataclass(frozen=True)
class Change:
    key: str  # dotted, as --set and --allow-change take it
    flag: str  # the flag that gives the new value (a switch: its side, --no-mlp)
    old_flag: str  # the one that gives the old value
    old: Any
    new: Any
    fixed: bool  # the setting's resume policy

    def __str__(self) -> str:
        """As the user types it: `--epochs 1 -> 2`, `--mlp -> --no-mlp`."""
        if isinstance(self.new, bool) and self.flag != self.old_flag:
            return f"{self.old_flag} -> {self.flag}"
        return f"{self.flag} {value_text(self.old)} -> {value_text(self.new)}"


def value_text(value: Any) -> str:
    """A value as a flag takes it (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def setting_changes(cls: type[BaseModel], old: dict, new: dict) -> list[Change]:
    """Settings whose values differ between two saved configurations (model_dump(mode="json") dicts), in
    field order; a setting missing from either side (saved by another version) is not a change."""
    before, after = flatten(cls, migrate_values(cls, old)), flatten(cls, new)
    return [Change(dotted(path), canonical_flag(cls, path, after[path]) or dotted(path),
                   canonical_flag(cls, path, before[path]) or dotted(path), before[path], after[path],
                   field_extra(field)["resume"] == "fixed")
            for path, field in known_paths(cls).items()
            if path in before and path in after and before[path] != after[path]]


def format_validation_error(e: ValidationError, source: dict | None = None, cls=None) -> str:
    """One line: each problem prefixed by where its value came from (flag, --set key, file: key)."""
    parts = []
    for err in e.errors():
        path = tuple(str(x) for x in err["loc"])
        where = (source or {}).get(path) or (cls and canonical_flag(cls, path, err.get("input"))) or dotted(path)
        msg = err["msg"].removeprefix("Value error, ")
        part = f"{where}: {msg}" if where else msg
        if part not in parts:  # a flag shared by two sections (--N) fails once, not twice
            parts.append(part)
    return "invalid settings: " + "; ".join(parts)
