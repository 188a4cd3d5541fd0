"""Strict schemas for cbir's files and option sets (pydantic v2), and their one-line errors.

Every file format and option set is a :class:`Schema` (a frozen pydantic model that refuses
unknown keys) declared in the module it belongs to: ``rerank.compose.Rerank``,
``rerank.diffusion.DiffusionParams``, ``rerank.recipe.RecipeFile``, ``index.persist.IndexManifest``,
``descriptors.DescriptorMeta`` / ``ShardMeta``, ``whitening.WhiteningMeta``. The field types here
are exact (no coercion): an integer field refuses ``2.5``, ``true`` and ``"2"``; a number field
refuses strings, booleans, NaN and infinities; a :data:`FileName` is a plain name inside its
folder (no ``/``, no ``..``). Limits, documented once:

- :data:`MAX_DIM` = 65,536: the largest descriptor dimension (a ``dim``);
- :data:`MAX_NEIGHBOURS` = 10,000: the largest K of QE, DBA and diffusion graphs;
- :data:`MAX_EXPONENT` = 100: the largest weight exponent (``alpha_qe``, ``dba_alpha``, ``gamma``);
- :data:`MAX_ROWS` = 2^40: the largest row count or id.

A violation raises :class:`SchemaError` (a :class:`cbir.fileio.FormatError`, so a ValueError) with
ONE line naming where and the field: ``recipe x.json: rerank.qe: must be an integer in [0, 10000]
(got 2.5)``; ``errors`` keeps (field, problem) pairs so the CLI can name its flags instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from .fileio import FormatError, check_format, read_json

MAX_DIM = 65_536
MAX_NEIGHBOURS = 10_000
MAX_EXPONENT = 100.0
MAX_ROWS = 1 << 40

T = TypeVar("T", bound="Schema")


class SchemaError(FormatError):
    """A file or an option set breaks its schema; the message is one line naming where and the field.

    ``errors``: [(field path such as ``rerank.qe`` or ``shards.0.name``, problem)], the first first."""

    def __init__(self, where: str, errors: list[tuple[str, str]]):
        self.where = where
        self.errors = errors
        first = errors[0] if errors else ("", "invalid")
        text = f"{first[0]}: {first[1]}" if first[0] else first[1]
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        line = f"{where}: {text}{more}" if where else text + more
        super().__init__(" ".join(line.splitlines()))  # one line, whatever a key or a path holds


def show(value: Any, limit: int = 60) -> str:
    """A short printable form of a bad value for the ``(got ...)`` of a message, in JSON notation
    (``"abc"``, ``true``, ``null``, ``NaN``, ``1e+30``) since most come from JSON files."""
    if isinstance(value, (dict, list, tuple)):
        n = len(value)
        return f"an object of {n} keys" if isinstance(value, dict) else f"a list of {n} items"
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(want: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError("cbir", "must be {want} (got {got})", {"want": want, "got": show(value)})


def _range_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    lo = f"[{ge:g}" if ge is not None else (f"({gt:g}" if gt is not None else None)
    hi = f"{le:g}]" if le is not None else (f"{lt:g})" if lt is not None else None)
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" >= {ge:g}" if ge is not None else f" > {gt:g}"
    if hi:
        return f" <= {le:g}" if le is not None else f" < {lt:g}"
    return ""


def _in_range(v: float, ge, gt, le, lt) -> bool:
    return not ((ge is not None and v < ge) or (gt is not None and v <= gt)
                or (le is not None and v > le) or (lt is not None and v >= lt))


def Int(ge: int | None = None, le: int | None = None, gt: int | None = None, lt: int | None = None) -> Any:
    """An exact integer (a JSON integer, a Python/numpy int; never a bool, float or string) in range."""
    want = "an integer" + _range_text(ge, gt, le, lt)

    def check(v: Any) -> int:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise _fail(want, v)
        v = int(v)
        if not _in_range(v, ge, gt, le, lt):
            raise _fail(want, v)
        return v

    return Annotated[int, BeforeValidator(check)]


def Float(ge: float | None = None, le: float | None = None, gt: float | None = None, lt: float | None = None) -> Any:
    """A finite number (int or float; never a bool, string, NaN or infinity) in range."""
    want = "a finite number" + _range_text(ge, gt, le, lt)

    def check(v: Any) -> float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _fail(want, v)
        try:
            f = float(v)
        except OverflowError:  # an integer beyond any float
            raise _fail(want, v) from None
        if not math.isfinite(f) or not _in_range(f, ge, gt, le, lt):
            raise _fail(want, v)
        return f

    return Annotated[float, BeforeValidator(check)]


def _bool(v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise _fail("true or false", v)
    return bool(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _fail("a string", v)
    return v


def _file_name(v: Any) -> str:
    if (not isinstance(v, str) or not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v
            or len(v) > 255 or os.path.isabs(v)):
        raise _fail("a plain file name inside its folder (no folder part, no '..')", v)
    return v


def _hex64(v: Any) -> str:
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise _fail("a sha256 (64 lowercase hex digits)", v)
    return v


def plain_json(v: Any, depth: int = 0) -> Any:
    """Plain JSON data (objects with string keys, lists, strings, finite numbers, booleans, null)."""
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, (int, np.integer)):
        return v
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            raise _fail("a finite number", v)
        return v
    if depth > 32:
        raise _fail("JSON data nested at most 32 deep", "...")
    if isinstance(v, (list, tuple)):
        return [plain_json(x, depth + 1) for x in v]
    if isinstance(v, dict):
        for key in v:
            if not isinstance(key, str):
                raise _fail("an object with string keys", key)
        return {k: plain_json(x, depth + 1) for k, x in v.items()}
    raise _fail("plain JSON data", v)


def _json_object(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail("a JSON object", v)
    return plain_json(v)


Bool = Annotated[bool, BeforeValidator(_bool)]
Str = Annotated[str, BeforeValidator(_str)]
FileName = Annotated[str, BeforeValidator(_file_name)]
Sha256 = Annotated[str, BeforeValidator(_hex64)]
#: Any plain JSON value (finite numbers only), for free-form informational fields.
JsonValue = Annotated[Any, BeforeValidator(plain_json)]
#: A JSON object of plain JSON values (finite numbers only).
JsonObject = Annotated[dict[str, Any], BeforeValidator(_json_object)]


# pydantic's own error types, said in the words of the messages above
_MESSAGES: dict[str, Callable[[dict], str]] = {
    "missing": lambda e: "is missing",
    "extra_forbidden": lambda e: "unknown key (misspelt? it is not part of this format)",
    "model_type": lambda e: f"must be a JSON object (got {show(e.get('input'))})",
    "model_attributes_type": lambda e: f"must be a JSON object (got {show(e.get('input'))})",
    "dict_type": lambda e: f"must be a JSON object (got {show(e.get('input'))})",
    "list_type": lambda e: f"must be a list (got {show(e.get('input'))})",
    "tuple_type": lambda e: f"must be a list (got {show(e.get('input'))})",
    "literal_error": lambda e: f"must be {e.get('ctx', {}).get('expected', '?')} (got {show(e.get('input'))})",
}


def _problem(err: dict) -> str:
    if err["type"] == "cbir":
        return err["msg"]
    if err["type"] in _MESSAGES:
        return _MESSAGES[err["type"]](err)
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif "input" in err:
        msg = f"{msg} (got {show(err['input'])})"
    return msg


def field_name(part: Any) -> str:
    """One part of a field path as printed: a key with unprintable characters in JSON quotes."""
    text = str(part)
    return text if text.isprintable() and text else json.dumps(text)


def _field(loc: tuple) -> str:
    return ".".join(field_name(p) for p in loc
                    if not (isinstance(p, str) and p.startswith(("function-", "nullable[", "union[", "list[", "dict[", "[key]"))))


def error_list(exc: ValidationError) -> list[tuple[str, str]]:
    """(field path, problem) of each error of a pydantic ValidationError (the SchemaError of a nested
    schema, raised by its ``__init__``, is expanded under the field that holds it)."""
    out = []
    for e in exc.errors(include_url=False):
        where = _field(tuple(e["loc"]))
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, SchemaError):
            out += [(".".join(p for p in (where, f) if p), msg) for f, msg in inner.errors]
        else:
            out.append((where, _problem(e)))
    return out


class Schema(BaseModel):
    """Base of every cbir schema: frozen, unknown keys refused, errors as :class:`SchemaError`.

    ``Model(**fields)`` in code and :meth:`parse` of loaded data both raise SchemaError
    (``where``: the class name, or the file) rather than pydantic's multi-line ValidationError."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    #: Field names that may also be given by position, in order (none unless a schema says so).
    positional_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **data: Any) -> None:
        names = type(self).positional_fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments, got {len(args)}")
        for name, value in zip(names, args):
            if name in data:
                raise TypeError(f"{type(self).__name__} got {name} twice")
            data[name] = value
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SchemaError(type(self).__name__, error_list(exc)) from None

    @classmethod
    def parse(cls: type[T], data: Any, where: str) -> T:
        """Validate loaded data; SchemaError naming ``where`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(where, error_list(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``type(m).parse(m.to_dict(), ...) == m``."""
        return self.model_dump(mode="json")


def load_schema(path: str | os.PathLike[str], cls: type[T], what: str, kind: str | None = None,
                versions: tuple[int, ...] | None = None, max_bytes: int | None = None) -> T:
    """Read the JSON file ``path`` (bounded size and depth, :func:`cbir.fileio.read_json`), check its
    format stamp when ``kind`` is given, and validate it as ``cls``; errors name ``what`` and the file."""
    path = Path(path)
    kw = {} if max_bytes is None else {"max_bytes": max_bytes}
    doc = read_json(path, what=what, **kw)
    if kind is not None:
        check_format(doc, kind, versions or (), path)
    return cls.parse(doc, f"{what} {path}")
