"""Hydra override grammar → Optuna search space, and sampled values → Hydra overrides.

Each entry of ``hydra.sweeper.params`` (and each command-line argument of the sweep) is one override in Hydra's
grammar. A sweep override becomes an Optuna distribution:

====================================  ==============================================================
override                              Optuna distribution
====================================  ==============================================================
``choice(a, b, ...)``, ``a,b,...``     ``CategoricalDistribution((a, b, ...))``
``interval(lo, hi)``                  ``FloatDistribution(lo, hi)``
``tag(log, interval(lo, hi))``        ``FloatDistribution(lo, hi, log=True)``
``tag(int, interval(lo, hi))``        ``IntDistribution(lo, hi)`` (``tag(int, log, ...)``: ``log=True``)
``range(start, stop[, step])``        ``IntDistribution(first, last, step=|step|)`` over the values the range
                                      yields (``stop`` excluded, as in Hydra); with a float bound
                                      ``FloatDistribution(first, last, step=|step|)``;
                                      ``tag(log, range(...))``: ``log=True`` (step 1 only)
====================================  ==============================================================

Any other override (``key=value``, ``+key=value``, ``~key``) is fixed: every trial gets it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import OverrideParseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

PRIMITIVES = (str, int, float, bool, type(None))
INTERVAL_TAGS = frozenset({"log", "int"})


def format_value(value: Any) -> str:
    """``value`` written in Hydra's override grammar, so that parsing ``key=<text>`` gives ``value`` back.

    Strings that would parse as another type (``"1"``, ``"true"``) or contain special characters are quoted.

    Raises:
        TypeError: ``value`` is not a string, number, bool, None, list or dict.
        ValueError: a string that cannot be written so that it parses back to itself.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        for text in (Override._get_value_element_as_str(value), "'" + value.replace("'", "\\'") + "'"):
            try:
                if _parse_one(f"k={text}").value() == value:
                    return text
            except OverrideParseException:
                continue
        raise ValueError(f"cannot write {value!r} as a Hydra override value")
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{format_value(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write a {type(value).__name__} ({value!r}) as a Hydra override value")


def _parse_one(line: str) -> Override:
    return OverridesParser.create().parse_overrides([line])[0]


def _interval(name: str, sweep: IntervalSweep) -> BaseDistribution:
    unknown = set(sweep.tags) - INTERVAL_TAGS
    if unknown:
        raise ValueError(f"{name}: unknown tag(s) {sorted(unknown)} on interval(); supported: {sorted(INTERVAL_TAGS)}")
    low, high, log = sweep.start, sweep.end, "log" in sweep.tags
    if low is None or high is None or low > high:
        raise ValueError(f"{name}: interval({low}, {high}) needs low <= high")
    if "int" in sweep.tags:
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"{name}: tag(int, interval({low}, {high})) needs integer bounds")
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _range(name: str, override: Override, sweep: RangeSweep) -> BaseDistribution:
    values = list(override.sweep_iterator())
    if not values:
        raise ValueError(f"{name}: range({sweep.start}, {sweep.stop}, {sweep.step}) is empty")
    low, high, step = min(values), max(values), abs(sweep.step)
    log = "log" in sweep.tags
    if log and step != 1:
        raise ValueError(f"{name}: tag(log, range(...)) needs step 1 (Optuna's log scale has no step)")
    if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
        return IntDistribution(int(low), int(high), log=log, step=1 if log else int(step))
    return FloatDistribution(float(low), float(high), log=log, step=None if log else float(step))


def to_distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (``choice``, ``interval``, ``range``; see the module doc).

    Choices that are lists or dicts are stored in Optuna as their override text (``"[16,32]"``).

    Raises:
        ValueError: ``override`` is not a sweep, an empty range, an interval with low > high or an unknown tag.
    """
    name = override.get_key_element()
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        choices = [v if isinstance(v, PRIMITIVES) else format_value(v) for v in override.sweep_iterator()]
        if not choices:
            raise ValueError(f"{name}: choice() has no values")
        return CategoricalDistribution(choices)
    if isinstance(sweep, IntervalSweep):
        return _interval(name, sweep)
    if isinstance(sweep, RangeSweep):
        return _range(name, override, sweep)
    raise ValueError(f"{name}={override.get_value_string()} is not a sweep (choice, interval or range)")


@dataclass
class SearchSpace:
    """The searched parameters (Optuna distributions) and the fixed overrides every trial gets.

    ``raw_choices[name]`` holds the choices of ``name`` that are stored as override text (lists, dicts).
    """

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)
    raw_choices: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def from_overrides(cls, lines: Iterable[str]) -> SearchSpace:
        """Parse override lines (``key=choice(...)``, ``key=value``, ``~key``); a later line for the same key
        wins (so the command line, given after ``hydra.sweeper.params``, overrides the config).

        Raises:
            hydra.errors.OverrideParseException: a line that is not valid override grammar.
            ValueError: a sweep that has no Optuna equivalent (see :func:`to_distribution`).
        """
        space = cls()
        for override in OverridesParser.create().parse_overrides(list(lines)):
            name = override.get_key_element()
            space.distributions.pop(name, None)
            space.fixed.pop(name, None)
            space.raw_choices.pop(name, None)
            if override.is_sweep_override():
                dist = to_distribution(override)
                space.distributions[name] = dist
                if isinstance(dist, CategoricalDistribution):
                    raw = {format_value(v) for v in override.sweep_iterator() if not isinstance(v, PRIMITIVES)}
                    if raw:
                        space.raw_choices[name] = raw
            else:
                space.fixed[name] = override.input_line or f"{name}={override.get_value_element_as_str()}"
        return space

    @classmethod
    def from_config(cls, params: Mapping[str, Any] | None, arguments: Sequence[str]) -> SearchSpace:
        """The space of ``hydra.sweeper.params`` (values: override text, or plain YAML values) followed by the
        sweep's command-line ``arguments``.

        Raises:
            hydra.errors.OverrideParseException, ValueError, TypeError: see :meth:`from_overrides` and
                :func:`format_value`.
        """
        lines = [f"{key}={value if isinstance(value, str) else format_value(value)}"
                 for key, value in (params or {}).items()]
        return cls.from_overrides([*lines, *arguments])

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """A trial's overrides: the fixed ones, then ``key=value`` for each sampled parameter in ``params``."""
        sampled = []
        for name, value in params.items():
            raw = isinstance(value, str) and value in self.raw_choices.get(name, ())
            sampled.append(f"{name}={value if raw else format_value(value)}")
        return [*self.fixed.values(), *sampled]

    def describe(self) -> str:
        """One line per parameter, for the sweep's log."""
        lines = [f"  {name}: {dist}" for name, dist in self.distributions.items()]
        lines += [f"  {line} (fixed)" for line in self.fixed.values()]
        return "\n".join(lines)
