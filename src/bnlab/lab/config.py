"""Run configs: canonical JSON, identity hashes, dotted overrides, and the audit context.

A run config is a JSON-able dict that fully determines a run's result (with the code that
computes it). Its identity is ``config_key(config, fingerprint)``: a hash of the canonical JSON of
the config (less where its files lie, :func:`identity`) plus the code fingerprint of its task
(see :func:`bnlab.lab.tasks.fingerprint`).

A claim's settings per profile are typed and validated (:class:`Schema`, :class:`Settings`): the
type and range of every key come from the profile's defaults and the claim's optional
``LIMITS``, and the same schema checks ``--set`` overrides before any run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, floats as repr (so 0.1 stays 0.1)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


# keys that say where a run's inputs lie, not what they are: left out of the identity of a dict
# that also holds ``source`` (the content's identity, e.g. the files' sha256)
LOCATION_KEYS = ("data_dir",)


def identity(obj: Any) -> Any:
    """What of a config identifies its run: the config without the location keys of any dict
    that carries its content's identity in ``source`` (moving the files keeps the key)."""
    if isinstance(obj, dict):
        drop = LOCATION_KEYS if isinstance(obj.get("source"), dict) else ()
        return {k: identity(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [identity(v) for v in obj]
    return obj


def config_key(config: dict, fingerprint: str) -> str:
    """The identity of a run: sha256 of its canonical :func:`identity` and its task's code
    fingerprint."""
    h = hashlib.sha256()
    h.update(canonical(identity(config)).encode())
    h.update(b"\0")
    h.update(fingerprint.encode())
    return h.hexdigest()[:32]


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when they parse (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["C1.steps=300", "C3.depths=[2,8]"]`` -> ``{"C1": {"steps": 300}, "C3": {"depths": [2, 8]}}``.

    Keys below the claim id may be dotted (``C2.nets.sigmoid.lr=1``); they are validated against
    the claim's settings by :class:`Schema` (:func:`claim_settings`).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE with KEY like C1.steps (got {item!r})")
        key, value = item.split("=", 1)
        parts = key.strip().split(".", 1)
        if len(parts) != 2 or not parts[1]:
            raise ValueError(f"--set key must start with a claim id, e.g. C1.steps=300 (got {key!r})")
        out.setdefault(parts[0].upper(), {})[parts[1]] = parse_value(value.strip())
    return out


def apply_overrides(settings: dict, overrides: dict[str, Any], where: str) -> dict:
    """A copy of ``settings`` with dotted ``overrides`` applied, each checked by type and range
    against the value it replaces (:class:`Schema`); unknown keys are rejected."""
    return Schema.from_profiles({"": settings}, "", where=where).apply(settings, overrides)


# ---------------------------------------------------------------- typed, validated claim settings
class SettingError(ValueError):
    """A claim setting (a profile default, a ``--set`` or ``--seeds`` value) of the wrong type or
    out of range; the message names the key, what it expects and the value given (``path``: the
    key, ``detail``: the rest)."""

    def __init__(self, message: str, path: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.path, self.detail = path, detail or message


_INF = math.inf


@dataclass(frozen=True)
class Limit:
    """A constraint on a number (an interval; ``None`` = unbounded) or on a string (``choices``).
    On a list it constrains each item. ``kind`` ("int", "float", "str", "bool") fixes the type
    where the default cannot tell (a ``None`` default); ``nullable`` admits ``null``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    kind: str | None = None
    nullable: bool | None = None

    def admits(self, x: Any) -> bool:
        if self.choices is not None:
            return x in self.choices
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            return False
        return True

    def describe(self, kind: str) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        noun = "an integer" if kind == "int" else "a number"
        lo, hi = self.low, self.high
        if lo is None and hi is None:
            return noun
        if hi is None:
            if kind == "int" and lo == 1 and not self.low_open:
                return "a positive integer"
            if lo == 0 and self.low_open:
                return "a positive integer" if kind == "int" else "a positive number"
            return f"{noun} {'>' if self.low_open else '>='} {_num(lo)}"
        if lo is None:
            return f"{noun} {'<' if self.high_open else '<='} {_num(hi)}"
        return f"{noun} in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}{')' if self.high_open else ']'}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]*)\s*,\s*([^,\s]*)\s*([\])])\s*$")


def as_limit(spec: Any, where: str = "") -> Limit:
    """A claim's ``LIMITS`` entry as a :class:`Limit`: a Limit; a ``(low, high)`` pair (closed,
    None = unbounded); an interval string such as ``"[0, 1)"`` or ``"(0, inf)"``; a set of
    allowed values (a set, or a tuple of strings); or a type (``int``, ``float``, ``str``,
    ``bool``)."""
    if isinstance(spec, Limit):
        return spec
    if isinstance(spec, type) and spec in (int, float, str, bool):
        return Limit(kind=spec.__name__)
    if isinstance(spec, (set, frozenset)):
        return Limit(choices=tuple(sorted(spec, key=str)))
    if isinstance(spec, str):
        m = _INTERVAL.match(spec)
        if not m:
            raise SettingError(f"{where}: limit {spec!r} is not an interval like '[0, 1)' or '(0, inf)'")
        bound = lambda t: None if t.lstrip("+-") in ("", "inf") else float(t)  # noqa: E731
        return Limit(bound(m.group(2)), bound(m.group(3)), m.group(1) == "(", m.group(4) == ")")
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(v, str) for v in spec):
        return Limit(choices=tuple(spec))
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in spec):
        return Limit(spec[0], spec[1])
    raise SettingError(f"{where}: cannot read limit {spec!r} (a (low, high) pair, an interval string, a set of "
                       "choices, a type or a Limit)")


# generic ranges, by key name, for numbers whose default lies in them
_PROBABILITY = re.compile(r"(^|_)(p|probs?|probability|fraction|momentum)$|dropout")
_SHARE = re.compile(r"(^|_)(target|threshold|share)s?$")
_MAY_BE_ZERO = re.compile(r"(^|_)(weight_decay|decay|wd|l2)$")


@dataclass
class Spec:
    """The type and range of one setting (derived from a profile's default, see :class:`Schema`)."""

    kind: str  # "bool", "int", "float", "str", "list", "dict", "any"
    nullable: bool = False
    limit: Limit | None = None  # numbers and strings
    item: "Spec | None" = None  # lists
    nonempty: bool = False  # lists
    unique: bool = False  # lists
    fields: dict[str, "Spec"] | None = None  # dicts

    def describe(self) -> str:
        if self.kind == "list":
            what = ("a non-empty list" if self.nonempty else "a list") + (" of distinct items" if self.unique else "")
            inner = f", each item {self.item.describe()}" if self.item is not None and self.item.kind != "any" else ""
            text = what + inner
        elif self.kind == "dict":
            text = "a section {" + ", ".join(sorted(self.fields or {})) + "}"
        elif self.kind in ("int", "float"):
            text = (self.limit or Limit()).describe(self.kind)
        elif self.kind == "str":
            text = self.limit.describe("str") if self.limit and self.limit.choices is not None else "a string"
        elif self.kind == "bool":
            text = "true or false"
        else:
            text = "any value"
        return text + (" or null" if self.nullable and self.kind != "any" else "")

    def check(self, value: Any, path: str) -> Any:
        """``value`` if it fits (ints widened to floats where numbers are expected), else a
        :class:`SettingError` naming ``path``, what it expects and what it got."""
        if value is None:
            if self.nullable or self.kind == "any":
                return None
            raise self._error(path, value)
        if self.kind == "any":
            return value
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise self._error(path, value)
        if self.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self._error(path, value)
            if self.kind == "int" and not isinstance(value, int):
                raise self._error(path, value, "a float where an integer is expected"
                                  if math.isfinite(value) else "not a finite number")
            if not math.isfinite(value):
                raise self._error(path, value, "not a finite number")
            if self.limit is not None and not self.limit.admits(value):
                raise self._error(path, value, "out of range")
            return float(value) if self.kind == "float" else value
        if self.kind == "str":
            if not isinstance(value, str):
                raise self._error(path, value)
            if self.limit is not None and self.limit.choices is not None and value not in self.limit.choices:
                raise self._error(path, value, "not one of the choices")
            return value
        if self.kind == "list":
            if not isinstance(value, list):
                raise self._error(path, value)
            if self.nonempty and not value:
                raise self._error(path, value, "empty")
            out = [self.item.check(v, f"{path}[{i}]") if self.item is not None else v for i, v in enumerate(value)]
            if self.unique and len({canonical(v) for v in out}) != len(out):
                raise self._error(path, value, "repeated items")
            return out
        if self.kind == "dict":
            if not isinstance(value, dict):
                raise self._error(path, value)
            fields = self.fields or {}
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise SettingError(f"{path}: unknown setting {unknown[0]!r}; known keys here: {', '.join(sorted(fields))}")
            missing = sorted(set(fields) - set(value))
            if missing:
                raise SettingError(f"{path}: missing setting {missing[0]!r} (expected {self.describe()})")
            return {k: fields[k].check(v, f"{path}.{k}") for k, v in value.items()}
        raise SettingError(f"{path}: unknown setting kind {self.kind!r}")

    def _error(self, path: str, value: Any, why: str | None = None) -> SettingError:
        if why is None:
            if isinstance(value, bool):
                why = "a boolean"
            elif value is None:
                why = "null"
            elif isinstance(value, str):
                why = "not a number" if self.kind in ("int", "float") else "a string"
            elif isinstance(value, (int, float)):
                why = "a number"
            elif isinstance(value, list):
                why = "a list"
            elif isinstance(value, dict):
                why = "a section"
            else:
                why = type(value).__name__
        detail = f"expected {self.describe()}, got {_show(value)} ({why})"
        return SettingError(f"{path}: {detail}", path, detail)


def _show(value: Any) -> str:
    try:
        text = canonical(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _numeric_limit(name: str, kind: str, values: list) -> Limit | None:
    """The generic range of a number setting from its default(s): probabilities (dropout rates,
    fractions, momentum) in [0, 1); shares (accuracy targets, thresholds) in (0, 1]; penalties
    (weight decay) >= 0; otherwise > 0 when the default is > 0, >= 0 when it is 0, unbounded when
    it is negative. A claim's ``LIMITS`` replaces any of these."""
    if not values:
        return None
    lo, hi = min(values), max(values)
    if _PROBABILITY.search(name) and 0 <= lo and hi < 1:
        return Limit(0, 1, high_open=True)
    if _SHARE.search(name) and 0 < lo and hi <= 1:
        return Limit(0, 1, low_open=True)
    if _MAY_BE_ZERO.search(name) and lo >= 0:
        return Limit(0)
    if lo > 0:
        return Limit(1) if kind == "int" else Limit(0, low_open=True)
    if lo == 0:
        return Limit(0)
    return None


def _kind_of(values: list) -> str:
    """The kind of a setting from its non-null values in every profile."""
    if not values:
        return "any"
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float"
    if all(isinstance(v, str) for v in values):
        return "str"
    if all(isinstance(v, list) for v in values):
        return "list"
    if all(isinstance(v, dict) for v in values):
        return "dict"
    return "any"


def derive_spec(name: str, default: Any, others: list[Any] = ()) -> Spec:
    """A setting's :class:`Spec` from its default, with the same key's values in the claim's other
    profiles (to type a ``None`` default or an empty list, and to admit ``null`` where any profile
    uses it); the range comes from this profile's default."""
    everything = [default, *others]
    present = [v for v in everything if v is not None]
    kind = _kind_of(present)
    nullable = any(v is None for v in everything)
    if kind in ("int", "float"):
        basis = [default] if default is not None else present
        return Spec(kind, nullable, limit=_numeric_limit(name, kind, basis))
    if kind == "list":
        items = [x for v in present for x in v]
        basis = list(default) if isinstance(default, list) and default else items
        item = derive_spec(_singular(name), basis[0] if basis else None, items) if items else None
        if item is not None and item.kind in ("int", "float"):
            item.limit = _numeric_limit(name, item.kind, [x for x in basis if x is not None])
        return Spec("list", nullable, item=item, nonempty=bool(default), unique=name == "seeds")
    if kind == "dict":
        fields = {}
        base = default if isinstance(default, dict) else present[0]
        for k in base:
            fields[k] = derive_spec(k, base[k], [v[k] for v in present if v is not base and k in v])
        return Spec("dict", nullable, fields=fields)
    return Spec(kind, nullable)


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") and len(name) > 1 else name


class Settings(dict):
    """A claim's resolved settings for one profile: a plain dict of JSON values (claims read it
    as ``ctx.settings["steps"]``) that has passed its :class:`Schema`; ``.schema`` validates more
    overrides (``settings.schema.apply(settings, {"steps": 300})``)."""

    schema: "Schema"

    def __init__(self, values: dict, schema: "Schema") -> None:
        super().__init__(values)
        self.schema = schema

    def __deepcopy__(self, memo) -> "Settings":
        return Settings(copy.deepcopy(dict(self), memo), self.schema)

    def __reduce__(self):
        return (Settings, (dict(self), self.schema))


class Schema:
    """The typed settings of one claim and profile: one :class:`Spec` per key, derived from the
    profile's defaults (types from the values, ranges by the generic rules of
    :func:`_numeric_limit`), tightened or widened by the claim's optional ``LIMITS`` (dotted key
    -> constraint, see :func:`as_limit`). The same object validates the defaults, ``--set``
    overrides and ``--seeds``."""

    def __init__(self, spec: Spec, where: str) -> None:
        self.spec, self.where = spec, where

    @classmethod
    def from_profiles(cls, profiles: dict[str, dict], profile: str, limits: dict | None = None,
                      where: str = "") -> "Schema":
        defaults = profiles[profile]
        others = [p for name, p in profiles.items() if name != profile]
        spec = derive_spec("", defaults, others)
        for dotted, constraint in (limits or {}).items():
            target = _lookup(spec, dotted)
            if target is None:
                if any(_has_path(p, dotted) for p in profiles.values()):
                    continue  # a key of another profile
                raise SettingError(f"{where}: LIMITS names unknown setting {dotted!r}")
            lim = as_limit(constraint, f"{where}.{dotted}")
            if lim.kind is not None:
                if target.kind == "list":
                    target.item = Spec(lim.kind)
                else:
                    target.kind = lim.kind
            if lim.nullable is not None:
                target.nullable = lim.nullable
            bounded = lim.choices is not None or lim.low is not None or lim.high is not None
            if bounded:
                if target.kind == "list" and target.item is not None:
                    target.item.limit = lim
                else:
                    target.limit = lim
        schema = cls(spec, where)
        try:
            schema.validate(defaults)  # a claim's own defaults must obey its LIMITS
        except SettingError as e:
            raise SettingError(f"{where}: profile {profile!r} breaks the claim's LIMITS: {e}", e.path, e.detail) from None
        return schema

    def validate(self, settings: dict) -> Settings:
        """Every key present and known, every value of its type and in its range."""
        return Settings(self.spec.check(settings, self.where), self)

    def field(self, dotted: str) -> Spec:
        spec = _lookup(self.spec, dotted)
        if spec is None:
            raise SettingError(f"{self.where}: unknown setting {dotted!r}")
        return spec

    def check(self, dotted: str, value: Any) -> Any:
        """One value for the key ``dotted``, checked (and widened) as the settings would check it."""
        return self.field(dotted).check(value, f"{self.where}.{dotted}")

    def apply(self, settings: dict, overrides: dict[str, Any]) -> Settings:
        """A copy of ``settings`` with dotted ``overrides`` applied, each checked before the rest;
        errors say ``--set CLAIM.key=value: ...``."""
        out = copy.deepcopy(dict(settings))
        for dotted, value in overrides.items():
            node, spec = out, self.spec
            parts = dotted.split(".")
            for i, part in enumerate(parts):
                fields = spec.fields if spec.kind == "dict" else None
                if not isinstance(node, dict) or fields is None or part not in fields:
                    known = ", ".join(sorted(fields)) if fields else "(not a section)"
                    raise SettingError(
                        f"{self.where}: unknown setting {'.'.join(parts[: i + 1])!r} in --set {self.where}.{dotted}="
                        f"{_show(value)}; "
                        f"known keys here: {known}")
                spec = fields[part]
                if i == len(parts) - 1:
                    full = f"{self.where}.{dotted}"
                    try:
                        node[part] = spec.check(value, full)
                    except SettingError as e:
                        where = e.detail if e.path == full else f"{e.path}: {e.detail}"
                        given = value if isinstance(value, str) else _show(value)  # as typed
                        raise SettingError(f"--set {full}={given}: {where}", full, where) from None
                else:
                    node = node[part]
        return self.validate(out)


def _lookup(spec: Spec, dotted: str) -> Spec | None:
    for part in dotted.split("."):
        if spec.kind != "dict" or not spec.fields or part not in spec.fields:
            return None
        spec = spec.fields[part]
    return spec


def _has_path(d: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def claim_settings(claim_id: str, profiles: dict[str, dict], profile: str, overrides: dict[str, Any] | None = None,
                   limits: dict | None = None) -> Settings:
    """A claim's validated :class:`Settings` for ``profile`` with ``--set`` ``overrides`` applied
    (:class:`SettingError` on an unknown key, a wrong type or a value out of range)."""
    schema = Schema.from_profiles(profiles, profile, limits, where=claim_id)
    return schema.apply(profiles[profile], overrides or {})


@dataclass
class Context:
    """What a claim needs to expand its runs: profile, seed set, resolved settings, data choice."""

    profile: str
    seeds: list[int]
    settings: dict
    dataset: str | None = None
    data_dir: str | None = None
    workers: int = 2
    extra: dict = field(default_factory=dict)
    # Seed sets (rules v2, robustness): the seeds are split into disjoint chunks and a claim makes
    # one run per (arm, chunk), so that a robustness cell on one seed set and the headline that
    # pools both sets share their runs. Default: one chunk holding every seed.
    seed_sets: list[list[int]] | None = None
    # The seed that learning-rate selection uses (the first seed of the whole seed list), shared
    # by the headline and every robustness cell so that they train at the same rates.
    selection_seed: int | None = None

    def __post_init__(self) -> None:
        if self.seed_sets is None:
            self.seed_sets = [list(self.seeds)]
        if self.selection_seed is None:
            self.selection_seed = self.seeds[0]

    @property
    def first_seed(self) -> int:
        """The seed learning-rate selection uses (CLAIMS.md shared settings)."""
        return self.selection_seed
