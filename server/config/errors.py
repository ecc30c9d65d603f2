"""What every config file model shares, and the one translation of pydantic's validation
errors into ConfigError lines: where (file, line), key, what was expected, what was got.

A field's `description` says what its value must be ("a number of seconds above 0"): it is
what operators' editors show from the JSON Schema and what "must be ..." says on an error.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Tag, ValidationError
from pydantic.fields import FieldInfo

from residency.server.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

Loc = tuple[int | str, ...]
# Maps an error's location to the text that starts its line (a file, or a file, line and rule)
# and how many leading items of the location that text already names.
Where = Callable[[Loc], tuple[str, int]]

_PLAIN = {
    "string_type": "a string",
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
}


class FileModel(BaseModel):
    """A mapping in a config file: no unknown keys, no silent conversions (YAML's `true` is
    not 1, `2.5` is not a whole number, `"30"` is not a number), read-only once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def tagged_by(key: str, default: str) -> Discriminator:
    """Tells the models of a union apart by `key` (`default` when the mapping omits it)."""

    def tag(value: Any) -> Any:
        return value.get(key, default) if isinstance(value, dict) else getattr(value, key, None)

    return Discriminator(
        tag,
        custom_error_type="unknown_tag",
        custom_error_message=f"unknown {key}",
        custom_error_context={"key": key},
    )


def empty_if_null(empty: Callable[[], Any], shown_as: Any) -> BeforeValidator:
    """YAML's empty value (`rules:` with nothing after it) stands for an empty list or mapping,
    as it did before the files had models; the JSON Schema (`shown_as`) allows it too."""
    return BeforeValidator(lambda v: empty() if v is None else v, json_schema_input_type=shown_as)


def read_model(path: Path, model: type[M], what: str) -> M:
    """A YAML file read and validated by `model`: a file that cannot be read or parsed, and
    every problem the model finds, is a ConfigError naming the file."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read {what}: {e}") from e
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise config_error(e, model, str(path)) from None


def config_error(
    error: ValidationError, model: type[BaseModel], where: str | Where, quote: bool = True
) -> ConfigError:
    """Every problem `error` found in a `model` document, one line each. Keys are quoted
    (`'keys.kem' must be ...`) unless `quote` is false (the rules file's style)."""
    q = "'" if quote else ""
    locate: Where = (lambda loc: (where, 0)) if isinstance(where, str) else where
    lines: list[str] = []
    unknown: dict[Loc, list[str]] = {}
    for e in error.errors():
        loc: Loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":  # one line per mapping, naming every unknown key
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        prefix, named = locate(loc)
        place = _Place(model, loc)
        key, text = _explain(e, place)
        if e["type"] == "value_error" and loc and isinstance(loc[-1], int):
            # A list item's own check names the item; its index would say less.
            lines.append(f"{prefix}: {text}")
        else:
            key = place.key(named, key)
            sep = ":" if e["type"] == "value_error" else ""  # a check's own message is a sentence
            lines.append(f"{prefix}: {q}{key}{q}{sep} {text}" if key else f"{prefix}: {text}")
    for loc, names in unknown.items():
        prefix, named = locate(loc)
        place = _Place(model, loc)
        known = sorted(_fields(place.type)) if _is_model(place.type) else []
        text = f"unknown key(s) {sorted(names)}{place.tag}; known keys are {known}"
        key = place.key(named)
        lines.append(f"{prefix}: {q}{key}{q} has {text}" if key else f"{prefix}: {text}")
    # A union (e.g. `int | str`) reports each of its arms alike: say each problem once.
    return ConfigError("\n".join(dict.fromkeys(lines)))


def _explain(e: Any, place: _Place) -> tuple[str, str]:
    """(extra key under the place, text) for one error."""
    kind, got, ctx = e["type"], _got(e.get("input")), e.get("ctx") or {}
    described = place.field.description if place.field is not None else None
    if kind == "missing" or (kind == "string_too_short" and ctx.get("min_length") == 1):
        return "", f"is required{place.tag}" + (f": {described}" if described else "")
    if kind == "unknown_tag":
        if not isinstance(e.get("input"), dict):
            return "", f"must be a mapping, got {got}"
        tags = [m.tag for arg in get_args(place.type) for m in get_args(arg)[1:] if isinstance(m, Tag)]
        return ctx["key"], f"must be one of {tags}, got {_got(e['input'].get(ctx['key']))}"
    if kind == "literal_error":
        return "", f"must be one of {list(get_args(place.type))}, got {got}"
    if kind == "value_error":
        return "", str(ctx["error"])
    if kind in ("model_type", "dict_type"):
        return "", f"must be a mapping, got {got}"
    expected = described or _PLAIN.get(kind) or e["msg"].replace("Input should be ", "")
    return "", f"must be {expected}, got {got}"


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _strip(t: Any) -> Any:
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    return t


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields by the key the file spells them with."""
    return {f.alias or name: f for name, f in model.model_fields.items()}


class _Place:
    """A location in a model's document: its key as written (`affiliates[1].bucket`), the
    field and type there, and which variant of a union it is in (" for sink s3")."""

    def __init__(self, model: type[BaseModel], loc: Loc):
        self.parts: list[tuple[int, str]] = []  # (index in loc, text)
        self.field: FieldInfo | None = None
        self.tag = ""
        t: Any = model
        i = 0
        while i < len(loc):
            item = loc[i]
            t = _strip(t)
            if get_origin(t) in (Union, types.UnionType):
                members = [a for a in get_args(t) if a is not type(None)]
                variant = next((a for a in members if Tag(str(item)) in get_args(a)[1:]), None)
                if variant is not None:  # the location names the variant, not a key
                    t = _strip(variant)
                    self.tag = f" for {self._tag_key(t, item)} {item}"
                    i += 1
                    continue
                if len(members) == 1:
                    t = members[0]
                    continue
                break
            if _is_model(t):
                self.field = _fields(t).get(str(item))
                t = self.field.annotation if self.field is not None else Any
                self.parts.append((i, str(item)))
            elif get_origin(t) in (list, tuple):
                self.field, t = None, get_args(t)[0]
                self.parts.append((i, f"[{item}]"))
            elif get_origin(t) is dict:
                self.field, t = None, get_args(t)[1]
                self.parts.append((i, str(item)))
            else:
                break
            i += 1
        self.type = _strip(t)
        if get_origin(self.type) in (Union, types.UnionType):  # `X | None`: the X
            members = [a for a in get_args(self.type) if a is not type(None)]
            self.type = _strip(members[0]) if len(members) == 1 else self.type

    @staticmethod
    def _tag_key(model: Any, tag: int | str) -> str:
        return next(
            name
            for name, f in model.model_fields.items()
            if get_origin(f.annotation) is Literal and tag in get_args(f.annotation)
        )

    def key(self, named: int = 0, extra: str = "") -> str:
        """The key from the part of the location the line's start does not already name."""
        text = ""
        for i, part in self.parts:
            if i >= named:
                text += part if part.startswith("[") or not text else f".{part}"
        if extra:
            text = f"{text}.{extra}" if text else extra
        return text
