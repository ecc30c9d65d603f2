"""The transfer rules file: its model, and the loaders that read it into the core's `RuleSet`.

Every problem is reported at once, naming the file, the line and the rule: each recipient and
rule is checked on its own (keys, types, Fides taxonomy), then against the others and the
schema (duplicate ids, unknown recipients, rules that can never match)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import Field, ValidationError, field_validator

from residency.server.config.errors import FileModel, config_error, empty_if_null
from residency.server.config.schema import DataCategory, DataUse
from residency.server.core import countries
from residency.server.core.errors import ConfigError
from residency.server.core.rules import (
    LegalBasis,
    Recipient,
    Rule,
    RuleSet,
    Safeguard,
    SafeguardKind,
    covers,
)
from residency.server.core.schema import Schema
from residency.server.core.transform import name_of, unfit


class RecipientFile(FileModel):
    """A company data goes to; PIPL Art. 39 requires the user to be told its name and contact."""

    id: str = Field(min_length=1, description="the recipient's id, which rules name")
    region: str = Field(min_length=1, description="the affiliate region the recipient is in")
    company: str = Field(min_length=1, description="the recipient's legal name")
    contact: str = Field(min_length=1, description="how the user reaches the recipient")
    country: str | None = Field(
        default=None,
        description="an ISO 3166-1 alpha-2 code, e.g. SG: the country the recipient's servers are in "
        "(default: the region's, where known)",
    )

    @field_validator("country")
    @classmethod
    def _alpha_2(cls, code: str | None) -> str | None:
        if code is not None and not countries.is_alpha_2(code):
            hint = countries.suggest(code)
            raise ValueError(
                f"{code[:60]!r} is not an ISO 3166-1 alpha-2 country code"
                + (f" (did you mean {hint}?)" if hint else "")
            )
        return code


class SafeguardFile(FileModel):
    """What makes a transfer abroad lawful beside its legal basis (GDPR Art. 46, PIPL Art. 38)."""

    kind: SafeguardKind = Field(
        description="scc (EU standard contractual clauses), cac_standard_contract (the CAC standard "
        "contract, filed), certification or adequacy"
    )
    reference: str = Field(
        min_length=1,
        max_length=500,
        description="what identifies it: the clauses' module and date, the filing number, the "
        "certificate or the adequacy decision",
    )


class RuleFile(FileModel):
    """What may go to one recipient, for which purposes, on which legal basis."""

    id: str = Field(min_length=1, description="the rule's id, unique in the file")
    recipient: str = Field(min_length=1, description="the id of one of the file's recipients")
    purposes: list[DataUse] = Field(min_length=1, description="a list of at least one Fides data use")
    legal_basis: LegalBasis
    categories: list[DataCategory] = Field(
        min_length=1, description="a list of at least one Fides data category"
    )
    exclude: Annotated[list[DataCategory], empty_if_null(list, list[DataCategory] | None)] = Field(
        default=[], description="a list of Fides data categories kept back"
    )
    requires_consent: bool = Field(
        default=False,
        description="true or false: whether the user's consent is required (always, for consent)",
    )
    retention_days: int | None = Field(
        default=None, gt=0, description="a positive whole number of days the destination may keep a copy"
    )
    safeguards: Annotated[list[SafeguardFile], empty_if_null(list, list[SafeguardFile] | None)] = Field(
        default=[], description="a list of {kind, reference}: the safeguards the transfer is made under"
    )
    transform: Annotated[dict[str, Any], empty_if_null(dict, dict[str, Any] | None)] = Field(
        default={},
        description="field name to the form it goes and is served in instead of its value: "
        "{mask: N} (the last N characters kept), hash, truncate or year_of_birth",
    )


class _Top(FileModel):
    """The keys of a rules file other than its recipients and rules."""

    # Any scalar YAML reads (1, 1.1, "v3", 2026-01-01): it only labels the file for people.
    version: int | float | str | date = Field(
        default=1, description="a label for people (the rule set's version is a hash)"
    )
    home_region: str = Field(min_length=1, description="the region the records live in, e.g. cn-north")
    never_transfer: Annotated[list[DataCategory], empty_if_null(list, list[DataCategory] | None)] = Field(
        default=[], description="a list of Fides data categories"
    )


class RulesFile(_Top):
    """What may leave the home region. Default deny: a field goes only where a rule sends it."""

    recipients: Annotated[list[RecipientFile], empty_if_null(list, list[RecipientFile] | None)] = Field(
        default=[], description="the companies data may go to"
    )
    rules: Annotated[list[RuleFile], empty_if_null(list, list[RuleFile] | None)] = Field(
        default=[], description="what may go to each recipient"
    )


class _Outline(_Top):
    """The file with its recipients and rules left to be checked one by one, so that one
    broken rule hides no other rule's problems."""

    recipients: Annotated[list[Any], empty_if_null(list, list[Any] | None)] = []
    rules: Annotated[list[Any], empty_if_null(list, list[Any] | None)] = []


def load_rules(path: str | Path, schema: Schema) -> RuleSet:
    """Loads and validates a rules file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read rules: {e}") from e
    return rules_from_bytes(text, schema, str(path))


def rules_from_bytes(text: bytes, schema: Schema, where: str) -> RuleSet:
    """Parses and validates rules; the version is a hash of exactly these bytes."""
    try:
        doc = yaml.safe_load(text)
        lines = _rule_lines(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    return parse_rules(doc, schema, where, hashlib.sha256(text).hexdigest()[:16], lines)


def _rule_lines(text: bytes) -> list[int]:
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, v in node.value:
        if k.value == "rules" and isinstance(v, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in v.value]
    return []


def parse_rules(
    doc: Any, schema: Schema, where: str, version: str, lines: list[int] | None = None
) -> RuleSet:
    """Builds the rule set of a parsed rules document; `lines` are the rules' line numbers."""
    try:
        f = _Outline.model_validate(doc)
    except ValidationError as e:
        raise config_error(e, _Outline, where, quote=False) from None
    errors: list[str] = []
    recipients: dict[str, Recipient] = {}
    for i, raw in enumerate(f.recipients):
        r = _valid(RecipientFile, raw, f"{where}: recipients[{i}]", errors)
        if r is None:
            continue
        if r.id in recipients:
            errors.append(f"{where}: recipients[{i}]: duplicate recipient id {r.id!r}")
        if r.region == f.home_region:
            errors.append(f"{where}: recipient {r.id!r} is in the home region; it is not a transfer")
        recipients[r.id] = Recipient(r.id, r.region, r.company, r.contact, r.country or "")
    rules: list[Rule] = []
    for i, raw in enumerate(f.rules):
        line = lines[i] if lines and i < len(lines) else 0
        rid = raw.get("id") if isinstance(raw, dict) else None
        at = f"{where}:{line}: rule {rid or i!r}"
        checked = _valid(RuleFile, raw, at, errors)
        if checked is None:
            continue
        rule = Rule(
            id=checked.id,
            recipient=checked.recipient,
            purposes=tuple(checked.purposes),
            legal_basis=checked.legal_basis,
            categories=tuple(checked.categories),
            exclude=tuple(checked.exclude),
            requires_consent=checked.requires_consent or checked.legal_basis == "consent",
            retention_days=checked.retention_days,
            line=line,
            safeguards=tuple(Safeguard(g.kind, g.reference) for g in checked.safeguards),
        )
        forms = _forms(checked.transform, rule, schema, f"{at}: transform", errors)
        rule = dataclasses.replace(rule, transform=forms)
        if any(r.id == rule.id for r in rules):
            errors.append(f"{at}: duplicate rule id")
        if rule.recipient not in recipients:
            errors.append(f"{at}: unknown recipient {rule.recipient!r}")
        if not _matchable(rule, f.never_transfer, schema):
            errors.append(f"{at}: can never match: no schema field falls under its categories")
        rules.append(rule)
    if errors:
        raise ConfigError("\n".join(errors))
    return RuleSet(f.home_region, recipients, tuple(rules), tuple(f.never_transfer), version, schema, where)


M = TypeVar("M", bound=FileModel)


def _valid(model: type[M], raw: Any, where: str, errors: list[str]) -> M | None:
    """`raw` as a `model`, or None with its problems added to `errors`."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        errors.append(str(config_error(e, model, where, quote=False)))
        return None


def _forms(
    raw: dict[str, Any], rule: Rule, schema: Schema, where: str, errors: list[str]
) -> tuple[tuple[str, str], ...]:
    """A rule's `transform` as (field, canonical form) pairs; each problem, naming the key, in
    `errors`: an unknown field or transformation, one the field's type or category gives no
    meaning, or a field the rule does not send (the transformation would never apply)."""
    out = []
    for name, form in raw.items():
        spec = schema.fields.get(name)
        if spec is None:
            errors.append(f"{where}.{name}: unknown field: not declared in the schema")
            continue
        try:
            canonical = name_of(form)
        except ValueError as e:
            errors.append(f"{where}.{name}: {e}")
            continue
        if why := unfit(canonical, spec):
            errors.append(f"{where}.{name}: {why}")
        elif not any(covers(c, spec.category) for c in rule.categories):
            errors.append(
                f"{where}.{name}: the rule does not send it (its category {spec.category} is not listed)"
            )
        else:
            out.append((name, canonical))
    return tuple(sorted(out))


def _matchable(rule: Rule, never: list[str], schema: Schema) -> bool:
    """Whether some schema field falls under the rule's categories and is not kept back."""
    return any(
        any(covers(c, s.category) for c in rule.categories)
        and not any(covers(x, s.category) for x in rule.exclude)
        and not any(covers(n, s.category) for n in never)
        and not s.credential
        for s in schema.fields.values()
    )
