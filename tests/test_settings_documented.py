"""Every setting takes, through the environment (a string), each value its documentation names.

The documentation is read, not copied: ``docs/reference/settings.md`` when it exists, else
README.md: the repository's own files only.

What is read (tell the documentation's author; ``test_the_settings_table_is_found`` fails when
there is none):

- Every markdown table whose first header cell is ``env``. It needs a ``default`` column. Its values
  are read from a ``values`` column when there is one, else from the ``meaning`` column (and from the
  ``env`` cell itself, for "`POOLWATCH_X` = empty").
- ``env`` cell: the variables, in backticks (``POOLWATCH_X``, several per row allowed, e.g.
  "`POOLWATCH_HEALTH_DB_PATH` / `POOLWATCH_HEALTH_LIVE_PATH`"; an alias such as
  ``PROMETHEUS_MULTIPROC_DIR`` too). Each must name a setting.
- ``default`` cell: the default, backticks optional; ``unset``, ``—`` or empty for none; one per
  variable, separated by ", ", for a row of several.
- Values (the ``values`` or ``meaning`` cell):
  - every backticked word is a value the setting takes (`never`, `token`, `200`), except variable
    names (all capitals), event and metric names (`poolwatch.…`, `poolwatch_…`) and anything with a
    space, `=`, `<`, `>` or parentheses in it: so never put a word in backticks there that the
    setting does not take (write "answers degraded", not "answers `degraded`");
  - the word "empty": the empty string is a value;
  - "A or B" (numbers): both are values;
  - "A to B" (numbers): both are values and inclusive bounds;
  - "at least A" / "at most B": inclusive bounds; "more than A" / "less than B": exclusive bounds;
  - "0 turns … off": 0 is a value and the inclusive lower bound.
  Numbers may be in backticks.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest

from poolwatch import _settings
from poolwatch._settings import PoolWatchSettings, build_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "reference" / "settings.md"
SOURCE = DOCS if DOCS.exists() else ROOT / "README.md"

NUMBER = r"-?\d+(?:\.\d+)?"
# Settings a value needs beside it to be valid: a token mode needs a token.
COMPANIONS: dict[tuple[str, str], dict[str, str]] = {
    ("health_details", "token"): {"health_token": "s3cret"},
    ("ui", "token"): {"ui_token": "s3cret"},
}


@dataclass(frozen=True)
class Bound:
    value: str  # as documented
    lower: bool
    inclusive: bool

    def __str__(self) -> str:
        sign = (">=" if self.inclusive else ">") if self.lower else ("<=" if self.inclusive else "<")
        return f"{sign} {self.value}"


@dataclass
class Documented:
    setting: str
    variable: str
    default: str | None  # None: unset
    values: list[str] = field(default_factory=list)
    bounds: list[Bound] = field(default_factory=list)


# -- reading the table ---------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _tables(text: str) -> list[list[list[str]]]:
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            current.append(_cells(line))
        elif current:
            tables.append(current)
            current = []
    return tables


def _variables() -> dict[str, str]:
    variables = _settings.setting_variables()
    for name, info in PoolWatchSettings.model_fields.items():
        choices = getattr(info.validation_alias, "choices", ())
        variables.update({c.upper(): name for c in choices if isinstance(c, str) and c.isupper()})
    return variables


def _is_value(token: str) -> bool:
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", token):  # a variable
        return False
    if token.startswith(("poolwatch.", "poolwatch_")):  # an event or a metric
        return False
    return not re.search(r"[\s=<>()]", token)


def values_and_bounds(text: str) -> tuple[list[str], list[Bound]]:
    values = [token for token in re.findall(r"`([^`]*)`", text) if _is_value(token)]
    bounds: list[Bound] = []
    plain = text.replace("`", "")
    if re.search(r"\bempty\b", plain):
        values.append("")
    for low, high in re.findall(rf"(?<![\w.])({NUMBER}) or ({NUMBER})(?![\w.])", plain):
        values += [low, high]
    for low, high in re.findall(rf"(?<![\w.])({NUMBER}) to ({NUMBER})(?![\w.])", plain):
        values += [low, high]
        bounds += [Bound(low, lower=True, inclusive=True), Bound(high, lower=False, inclusive=True)]
    for words, lower, inclusive in (
        ("at least", True, True),
        ("at most", False, True),
        ("more than", True, False),
        ("less than", False, False),
    ):
        for number in re.findall(rf"\b{words} ({NUMBER})(?![\w.])", plain):
            bounds.append(Bound(number, lower, inclusive))
    if re.search(r"(?<![\w.])0 turns\b", plain):
        values.append("0")
        bounds.append(Bound("0", lower=True, inclusive=True))
    return list(dict.fromkeys(values)), list(dict.fromkeys(bounds))


def read_documented(text: str) -> list[Documented]:
    variables = _variables()
    rows: list[Documented] = []
    for table in _tables(text):
        header = [cell.strip("`* ").lower() for cell in table[0]]
        if not header or header[0] != "env":
            continue
        assert "default" in header, f"{SOURCE.name}: a settings table without a default column: {table[0]}"
        where = header.index("values") if "values" in header else header.index("meaning")
        for cells in table[2:]:  # after the header and its --- line
            cells = cells + [""] * (len(header) - len(cells))
            env_cell = cells[0]
            names = [n for n in re.findall(r"`([A-Z][A-Z0-9_]*)`", env_cell)]
            assert names, f"{SOURCE.name}: a settings row names no variable: {cells}"
            # An alias in parentheses ("(else `PROMETHEUS_MULTIPROC_DIR`)") is read like its setting.
            defaults_text = cells[header.index("default")].replace("`", "").strip()
            primary = [n for n in names if n.startswith("POOLWATCH_")]
            defaults = [d.strip() for d in defaults_text.split(",")] if len(primary) > 1 else [defaults_text]
            values, bounds = values_and_bounds(cells[where])
            env_values, _ = values_and_bounds(re.sub(r"`[A-Z][A-Z0-9_]*`", "", env_cell))
            for position, name in enumerate(names):
                assert name in variables, f"{SOURCE.name} documents {name}, which is no setting's variable"
                if name not in primary and variables[name] in {variables.get(p) for p in primary}:
                    continue  # an alias of this row's own setting
                default = defaults[position] if position < len(defaults) else defaults[-1]
                unset = default.lower() in {"", "unset", "—", "-", "none"}
                rows.append(
                    Documented(variables[name], name, None if unset else default, values + env_values, bounds)
                )
    return rows


DOCUMENTED = read_documented(SOURCE.read_text(encoding="utf-8"))


# -- the values as Python gives them ---------------------------------------------------------------


def _kinds(setting: str) -> tuple[type, ...]:
    """The plain types a setting takes (Optional and Literal unwrapped)."""
    annotation = PoolWatchSettings.model_fields[setting].annotation
    kinds: list[type] = []
    pending = [annotation]
    while pending:
        current = pending.pop()
        origin = typing.get_origin(current)
        if origin in (typing.Union, types.UnionType):
            pending += typing.get_args(current)
        elif origin is Literal:
            kinds += [type(arg) for arg in typing.get_args(current)]
        elif isinstance(current, type) and current is not type(None):
            kinds.append(current)
    return tuple(kinds)


def as_keyword(setting: str, text: str) -> Any:
    """What a Python caller passes for the documented ``text``: 200, not "200"."""
    kinds = _kinds(setting)
    if bool in kinds and text.lower() in {"true", "false"}:
        return text.lower() == "true"
    if int in kinds and re.fullmatch(r"-?\d+", text):
        return int(text)
    if float in kinds and re.fullmatch(NUMBER, text):
        return float(text)
    return text


def _number_kind(setting: str) -> type:
    kinds = _kinds(setting)
    return float if float in kinds else int


def _step(setting: str, value: str, outward: bool, lower: bool) -> Any:
    """The next value past ``value`` (outward) or inside it, in the setting's own type."""
    down = lower == outward
    if _number_kind(setting) is int:
        return int(value) - 1 if down else int(value) + 1
    return math.nextafter(float(value), -math.inf if down else math.inf)


def _as_env(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# -- settings through the environment and as keywords ---------------------------------------------


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("POOLWATCH_") or name.upper() == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(name)


def _from_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> PoolWatchSettings:
    with monkeypatch.context() as patch:
        for setting, value in values.items():
            patch.setenv("POOLWATCH_" + setting.upper(), value)
        return build_settings({})


def _with_companions(setting: str, value: str) -> dict[str, str]:
    return {setting: value, **COMPANIONS.get((setting, value), {})}


VALUES = [(row.setting, value) for row in DOCUMENTED for value in row.values]
BOUNDS = [(row.setting, bound) for row in DOCUMENTED for bound in row.bounds]


def test_the_settings_table_is_found() -> None:
    assert DOCUMENTED, f"no settings table (a markdown table whose first header cell is 'env') in {SOURCE}"
    assert VALUES and BOUNDS


@pytest.mark.parametrize(("setting", "value"), VALUES, ids=[f"{s}={v!r}" for s, v in VALUES])
def test_every_documented_value_is_taken_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: str
) -> None:
    given = _with_companions(setting, value)
    from_env = _from_env(monkeypatch, given)
    as_keywords = build_settings({name: as_keyword(name, text) for name, text in given.items()})
    assert getattr(from_env, setting) == getattr(as_keywords, setting), (setting, value)


@pytest.mark.parametrize(
    "row", [row for row in DOCUMENTED if row.default is not None], ids=lambda row: row.variable
)
def test_every_documented_default_is_taken_from_the_environment_and_is_the_default(
    monkeypatch: pytest.MonkeyPatch, row: Documented
) -> None:
    assert row.default is not None
    given = _with_companions(row.setting, row.default)
    assert getattr(_from_env(monkeypatch, given), row.setting) == getattr(build_settings({}), row.setting)
    assert getattr(build_settings({}), row.setting) == build_settings(
        {name: as_keyword(name, text) for name, text in given.items()}
    ).__getattribute__(row.setting), f"{SOURCE.name} says {row.variable} defaults to {row.default!r}"


@pytest.mark.parametrize(("setting", "bound"), BOUNDS, ids=[f"{s} {b}" for s, b in BOUNDS])
@pytest.mark.parametrize("given_as", ["keyword", "environment"])
def test_every_documented_bound_holds_at_the_bound_and_one_step_past_it(
    monkeypatch: pytest.MonkeyPatch, setting: str, bound: Bound, given_as: str
) -> None:
    at = as_keyword(setting, bound.value)
    if _number_kind(setting) is float:
        at = float(at)
    past = _step(setting, bound.value, outward=True, lower=bound.lower)
    inside = _step(setting, bound.value, outward=False, lower=bound.lower)
    accepted = [inside] + ([at] if bound.inclusive else [])
    refused = [past] + ([] if bound.inclusive else [at])

    def build(value: Any) -> PoolWatchSettings:
        if given_as == "keyword":
            return build_settings({setting: value})
        return _from_env(monkeypatch, {setting: _as_env(value)})

    for value in accepted:
        assert getattr(build(value), setting) == value, (setting, value)
    for value in refused:
        with pytest.raises(ValueError, match=rf"invalid setting {setting} \(POOLWATCH_{setting.upper()}\)"):
            build(value)


# -- the table is complete --------------------------------------------------------------------------


def test_every_setting_is_documented() -> None:
    documented = {row.setting for row in DOCUMENTED}
    missing = [name for name in PoolWatchSettings.model_fields if name not in documented]
    assert not missing, f"{SOURCE.name}'s settings table has no row for {missing}"


def _model_bounds(setting: str) -> set[tuple[float, bool, bool]]:
    bounds = set()
    for item in PoolWatchSettings.model_fields[setting].metadata:
        for kind, lower, inclusive in (
            (annotated_types.Ge, True, True),
            (annotated_types.Gt, True, False),
            (annotated_types.Le, False, True),
            (annotated_types.Lt, False, False),
        ):
            if isinstance(item, kind):
                bounds.add((float(getattr(item, kind.__name__.lower())), lower, inclusive))
    return bounds


@pytest.mark.parametrize("setting", [name for name in PoolWatchSettings.model_fields if _model_bounds(name)])
def test_the_documented_bounds_are_the_settings_bounds(setting: str) -> None:
    documented = {
        (float(bound.value), bound.lower, bound.inclusive)
        for row in DOCUMENTED
        if row.setting == setting
        for bound in row.bounds
    }
    assert documented == _model_bounds(setting), (
        f"{SOURCE.name} documents {setting}'s bounds as {sorted(documented)}, the setting has "
        f"{sorted(_model_bounds(setting))} (value, lower, inclusive)"
    )


# -- empty means unset ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variable",
    ["POOLWATCH_METRICS_PORT", "POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR",
     "POOLWATCH_HEALTH_TOKEN", "POOLWATCH_UI_TOKEN"],
)  # fmt: skip
def test_an_empty_variable_of_a_setting_unset_by_default_is_unset(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "")
    settings = build_settings({})
    setting = _variables()[variable]
    assert getattr(settings, setting) is None
    # An empty token is no token: a token mode without one still fails at start-up.
    if variable.endswith("_TOKEN"):
        mode = {"POOLWATCH_HEALTH_TOKEN": "health_details", "POOLWATCH_UI_TOKEN": "ui"}[variable]
        with pytest.raises(ValueError, match="token"):
            build_settings({mode: "token"})


# -- the reader itself -----------------------------------------------------------------------------


def test_the_reader_finds_values_and_bounds_and_skips_names() -> None:
    values, bounds = values_and_bounds(
        "`never`, `token` (with `POOLWATCH_HEALTH_TOKEN`) or `always`; logs `poolwatch.held_idle` into "
        "`poolwatch_held_idle_seconds`; empty (or `metrics_path=None`) serves none; (503 or 200); "
        "(0.01 to 3600); more than 0, at most `60`"
    )
    assert values == ["never", "token", "always", "60", "", "503", "200", "0.01", "3600"]
    assert bounds == [
        Bound("0.01", lower=True, inclusive=True),
        Bound("3600", lower=False, inclusive=True),
        Bound("60", lower=False, inclusive=True),
        Bound("0", lower=True, inclusive=False),
    ]
    assert values_and_bounds("0 turns leak detection off") == (["0"], [Bound("0", True, True)])
    table = (
        "| env | default | meaning |\n|---|---|---|\n"
        "| `POOLWATCH_HEALTH_DB_PATH` / `POOLWATCH_HEALTH_LIVE_PATH` | /health/db, /health/live | paths |\n"
        "| `POOLWATCH_MULTIPROC_DIR` (else `PROMETHEUS_MULTIPROC_DIR`) | unset | where |\n"
    )
    rows = read_documented(table)
    assert [(r.setting, r.default) for r in rows] == [
        ("health_db_path", "/health/db"),
        ("health_live_path", "/health/live"),
        ("multiproc_dir", None),
    ]
