"""Reading TOML tables into typed values, naming the field in every error."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pathlib
import sys
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "Table",
    "check_positive",
    "field_default",
    "load_factory",
    "read_document",
    "read_toml",
]


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name`, so a TOML reader never repeats it.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     delta: float = 1e-5
    >>> field_default(Example, "delta")
    1e-05

    Raises:
        TypeError: The field has no plain default (it is required, or uses a factory).
    """
    default = cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]
    if default is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no plain default")
    return default


def check_positive(value: float) -> str | None:
    """Return a problem if `value` is not positive."""
    return None if value > 0 else "must be > 0"


class Table:
    """One TOML table; reads typed fields and rejects keys nobody read.

    Example:
        >>> table = Table({"rounds": 3}, "rounds")
        >>> table.get("rounds", int, 1)
        3
        >>> table.finish()
    """

    def __init__(
        self,
        data: Any,
        path: str,
        *,
        base_dir: pathlib.Path | None = None,
        collect: bool = False,
        _root: Table | None = None,
    ) -> None:
        self._root = _root or self
        self._collect: bool = collect if _root is None else _root._collect
        self._problems: list[str] = []  # the root's: every problem its tables found
        self._children: list[Table] = []  # the root's: every table read below it
        self._path = path
        self._seen: set[str] = set()
        self._base_dir = base_dir or pathlib.Path.cwd()
        if not isinstance(data, Mapping):
            self._problem(f"[{path}] must be a table, got {type(data).__name__}")
            data = {}
        self._data = dict(data)

    def _problem(self, text: str) -> None:
        """Note a problem; without `collect` it is raised at once."""
        if not self._collect:
            raise ConfigError(text)
        self._root._problems.append(text)

    def done(self) -> None:
        """After a whole document was read: raise one error naming every problem in it.

        The problems are those noted while reading (wrong types, out-of-range values),
        then the unknown keys of every table read.
        """
        problems = list(self._problems)
        for table in (*self._children, self):
            if unknown := table._unknown():
                problems.append(unknown)
        if (error := _combined(problems)) is not None:
            raise error

    def failed(self, err: ConfigError) -> NoReturn:
        """Reading stopped at `err` (a missing key, say): raise it with the earlier problems."""
        if not self._problems:
            raise err
        combined = _combined([*self._problems, str(err)])
        assert combined is not None  # two or more problems
        raise combined from err

    def name(self, key: str) -> str:
        """Dotted name of `key` for messages."""
        return f"{self._path}.{key}" if self._path else key

    def get(
        self,
        key: str,
        kind: type[T],
        default: T,
        check: Callable[[T], str | None] | None = None,
    ) -> T:
        """Read `key` as `kind` (ints are accepted where floats are expected)."""
        self._seen.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._problem(
                f"{self.name(key)}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
            )
            return default
        if check is not None and (problem := check(value)):
            self._problem(f"{self.name(key)} = {value!r}: {problem}")
            return default
        return value

    def optional(self, key: str, kind: type[T]) -> T | None:
        """Read a field that may be absent (None then)."""
        if key not in self._data:
            self._seen.add(key)
            return None
        return self.get(key, kind, None)  # None: absent or of the wrong type (noted)

    def require(self, key: str, kind: type[T]) -> T:
        """Read a field that must be present."""
        if key not in self._data:
            # A misspelt key ("adress") is the usual cause: name it.
            unread = sorted(set(self._data) - self._seen - {key})
            close = difflib.get_close_matches(key, unread, n=1)
            hint = f" ({close[0]!r} is not a known key: did you mean {key!r}?)" if close else ""
            raise ConfigError(f"{self.name(key)} is required{hint}")
        present: T = self._data[key]  # checked against `kind` by get()
        noted = len(self._root._problems)
        value = self.get(key, kind, present)
        if len(self._root._problems) > noted:
            # A required value of the wrong type has no default to go on with: stop here.
            raise ConfigError(self._root._problems.pop())
        return value

    def path(self, key: str, default: str | None = None) -> pathlib.Path | None:
        """Read a path, relative to the config file's folder."""
        raw = self.optional(key, str) or default
        if raw is None:
            return None
        path = pathlib.Path(raw).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    def strings(self, key: str) -> tuple[str, ...] | None:
        """Read a list of strings; None when absent."""
        self._seen.add(key)
        if key not in self._data:
            return None
        value = self._data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._problem(f"{self.name(key)}: expected a list of strings, got {value!r}")
            return None
        return tuple(value)

    def scalars(self, key: str) -> dict[str, Scalar]:
        """Read a table of scalars (bool, int, float, str)."""
        self._seen.add(key)
        value = self._data.get(key, {})
        if not isinstance(value, Mapping):
            self._problem(f"{self.name(key)}: expected a table, got {value!r}")
            return {}
        scalars: dict[str, Scalar] = {}
        for item_key, item in value.items():
            if isinstance(item, bool | int | float | str):
                scalars[item_key] = item
            else:
                self._problem(
                    f"{self.name(key)}.{item_key}: expected bool, int, float or str, got {item!r}"
                )
        return scalars

    def table(self, key: str) -> Table:
        """Read a sub-table (empty when absent)."""
        self._seen.add(key)
        child = Table(
            self._data.get(key, {}), self.name(key), base_dir=self._base_dir, _root=self._root
        )
        self._root._children.append(child)
        return child

    def __bool__(self) -> bool:
        """Whether the table has any keys."""
        return bool(self._data)

    def ignore_rest(self) -> None:
        """Accept every key of a table that is switched off (``enabled = false``)."""
        self._seen.update(self._data)

    def finish(self) -> None:
        """Raise if the table holds keys that were never read (typos), naming the nearest."""
        if unknown := self._unknown():
            raise ConfigError(unknown)

    def _unknown(self) -> str | None:
        unknown = sorted(set(self._data) - self._seen)
        if not unknown:
            return None
        where = f"[{self._path}]" if self._path else "the top level"
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(self._seen), n=1)
            named.append(f"{key} (did you mean {close[0]!r}?)" if close else key)
        allowed = ", ".join(sorted(self._seen))
        return f"unknown key(s) in {where}: {', '.join(named)}; allowed: {allowed}"


def _combined(problems: list[str]) -> ConfigError | None:
    """One ConfigError for `problems` (None when there are none)."""
    unique = list(dict.fromkeys(problems))
    if len(unique) <= 1:
        return ConfigError(unique[0]) if unique else None
    listed = "\n".join(f"  - {problem}" for problem in unique)
    return ConfigError(f"{len(unique)} problems in the config:\n{listed}")


def load_factory(spec: str, *, field: str) -> Any:
    """Import ``module:attribute`` (the current directory is importable, as with ``python -m``).

    Raises:
        ConfigError: The module or attribute cannot be found.
    """
    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{field} = {spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{field} = {spec!r}: {module_name!r} has no {attribute!r}") from None


def read_toml(path: str | pathlib.Path) -> tuple[dict[str, Any], pathlib.Path]:
    """The TOML file at `path` and the folder its relative paths are resolved from.

    Raises:
        ConfigError: The file cannot be read or is not valid TOML (the message names it).
    """
    file = pathlib.Path(path)
    try:
        with open(file, "rb") as handle:
            return tomllib.load(handle), file.resolve().parent
    except OSError as err:
        raise ConfigError(f"cannot read config {file}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file} is not valid TOML: {err}") from err


def read_document(
    data: Mapping[str, Any], *, base_dir: pathlib.Path, read: Callable[[Table], T]
) -> T:
    """`read` over the whole TOML document `data`; every problem in it comes in one error.

    Raises:
        ConfigError: Everything `read` and the document's unknown keys got wrong.
    """
    top = Table(data, "", base_dir=base_dir, collect=True)
    result: T | None = None
    try:
        result = read(top)
    except ConfigError as err:
        top.failed(err)
    top.done()  # raises when anything failed
    assert result is not None
    return result
