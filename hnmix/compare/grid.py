"""`--grid key=v1,v2`: parsing, crossing and naming the runs of a comparison.

A value is kept as typed (a YAML scalar or list): it goes to the run as `--set key=TEXT` and into the run's
directory name, so `lr=0.03` stays `lr-0.03` rather than becoming a float's repr.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass

import yaml

from hnmix.errors import HnmixError

SEED = "seed"
# what a run may use: the same for every arm, or the comparison measures the budget, not the method
BUDGET_KEYS = ("data", "epochs", "batch_size", "max_steps")
# set by compare itself for each run
RUN_KEYS = ("output", "resume")


@dataclass(frozen=True)
class Axis:
    key: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Point:
    """One grid point: (key, value text) pairs in the order the grids were given."""

    items: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return dict(self.items).get(key)

    @property
    def name(self) -> str:
        """A readable directory name: method-mochi_seed-1 ('base' for the empty point)."""
        return "_".join(f"{key}-{safe_text(text)}" for key, text in self.items) or "base"

    @property
    def arm(self) -> Point:
        """The point without its seed: the runs of one arm differ only in the seed."""
        return Point(tuple((k, v) for k, v in self.items if k != SEED))

    @property
    def seed(self) -> str | None:
        return self.get(SEED)

    @property
    def sets(self) -> list[str]:
        return [f"{key}={text}" for key, text in self.items]

    def replace(self, values: dict[str, str]) -> Point:
        return Point(tuple((k, values.get(k, v)) for k, v in self.items))


def safe_text(text: str) -> str:
    """A value as a file-name part: anything but letters, digits, '.', '+', '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so a YAML list stays one value: synco_counts=[1,2,3],[4,5,6]."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def parse_axis(spec: str) -> Axis:
    key, sep, raw = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise HnmixError(f"--grid expects key=value1,value2,..., got '{spec}'")
    texts = tuple(text.strip() for text in split_top_level(raw))
    if any(not text for text in texts):
        raise HnmixError(f"--grid {spec}: empty value")
    if len(set(texts)) != len(texts):
        raise HnmixError(f"--grid {spec}: a value is repeated")
    for text in texts:
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            raise HnmixError(f"--grid {spec}: '{text}' is not a YAML value") from None
    return Axis(key, texts)


def parse_grid(specs: list[str], fields: list[str], sets: list[str], allow_budget_grid: bool) -> list[Axis]:
    """The grid axes, checked: known settings, each once, none that --set also fixes, no budget keys."""
    axes = [parse_axis(spec) for spec in specs]
    keys = [axis.key for axis in axes]
    set_keys = {item.partition("=")[0].strip().replace("-", "_") for item in sets}
    for key in keys:
        if keys.count(key) > 1:
            raise HnmixError(f"--grid {key} is given twice: give all its values in one --grid {key}=a,b")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise HnmixError(f"--grid: unknown setting '{key}'{hint}")
        if key in RUN_KEYS:
            raise HnmixError(f"--grid {key}: compare sets each run's {key} itself (DIR/RUN_NAME)")
        if key in set_keys:
            raise HnmixError(f"{key} is both a --grid and a --set: it can only be one")
        if key in BUDGET_KEYS and not allow_budget_grid:
            raise HnmixError(
                f"--grid {key}: every run gets the same budget ({', '.join(BUDGET_KEYS)} come from the base "
                f"config), or the comparison measures the budget instead of the method; --allow-budget-grid "
                f"to vary it anyway")
    for item in sets:
        if item.partition("=")[0].strip().replace("-", "_") in RUN_KEYS:
            raise HnmixError(f"--set {item}: compare sets each run's output and resume itself")
    return axes


def cross(axes: list[Axis]) -> list[Point]:
    """Every combination, in run order: seeds vary slowest, so a grid stopped half-way already holds
    whole seeds of every arm (a paired comparison) rather than every seed of the first arm."""
    order = sorted(range(len(axes)), key=lambda i: axes[i].key != SEED)
    points = []
    for combo in itertools.product(*(axes[i].texts for i in order)):
        chosen = dict(zip((axes[i].key for i in order), combo, strict=True))
        points.append(Point(tuple((axis.key, chosen[axis.key]) for axis in axes)))
    names = [p.name for p in points]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise HnmixError(f"two grid points share the run name '{clash}': use values that differ in letters "
                         "or digits")
    return points


def parse_baseline(text: str | None, axes: list[Axis]) -> dict[str, str]:
    """--baseline key=value[,key=value]: the values the reference arm has; default: the first value of the
    first grid that is not the seed. Keys left out match the arm being compared (lr=0.03 vs lr=0.03)."""
    arms = [axis for axis in axes if axis.key != SEED]
    if text is None:
        return {arms[0].key: arms[0].texts[0]} if arms else {}
    values = {}
    for part in split_top_level(text):
        key, sep, value = part.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        axis = next((a for a in arms if a.key == key), None)
        if not sep or axis is None:
            raise HnmixError(f"--baseline expects key=value with a grid key other than seed "
                             f"({', '.join(a.key for a in arms) or 'none'}), got '{part}'")
        if value not in axis.texts:
            raise HnmixError(f"--baseline {key}={value}: not one of the grid's values "
                             f"({', '.join(axis.texts)})")
        values[key] = value
    return values
