"""Transfer rules: what may leave the home region, to whom, for what, on which legal basis.

Evaluation is pure and default-deny. For a destination region and a purpose, `RuleSet.plan`
decides every schema field once (cached); projecting a record is then a dictionary filter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from residency.server.core.errors import ConfigError
from residency.server.core.schema import FieldSpec, Schema, data_categories, data_uses

LEGAL_BASES = frozenset(
    {
        "consent",
        "contract",
        "legal_obligation",
        "judicial_or_administrative_request",
        "violation_of_law_or_agreement",
        "ip_complaint",
        "transaction_dispute",
        "vital_interest",
        "public_interest",
    }
)

# Reasons a field is withheld, in the words the API, the log and the CLI use.
CREDENTIAL = "credential"
NEVER_TRANSFER = "never_transfer"
NO_RULE = "no_rule"
EXCLUDED = "excluded"
CONSENT_MISSING = "consent_missing"
SENSITIVE_CONSENT_MISSING = "sensitive_consent_missing"
COOKIE_CONSENT_MISSING = "cookie_consent_missing"
SENSITIVE = "sensitive_without_explicit_rule"
OUT_OF_SCOPE = "out_of_scope_without_explicit_rule"
RETENTION_EXPIRED = "retention_expired"
GRANT_ENDED = "grant_ended"
NOT_FOR_GROUND = "not_allowed_for_ground"

REASON_TEXT = {
    CREDENTIAL: "credentials are kept only as a hash and never leave the home region",
    NEVER_TRANSFER: "its category is on the never_transfer list",
    NO_RULE: "no rule allows this category to this destination for this purpose",
    EXCLUDED: "the rule that covers its category excludes it",
    CONSENT_MISSING: "the rule requires the user's consent, which is not on record",
    SENSITIVE_CONSENT_MISSING: "sensitive data under consent needs a separate consent for it (PIPL Art. 29)",
    COOKIE_CONSENT_MISSING: "cookie data goes only while the user's cookie consent stands (policy 5)",
    RETENTION_EXPIRED: "the copy is older than the rule's retention period",
    GRANT_ENDED: "the third-party grant that allowed it has ended or was revoked (policy 2a)",
    NOT_FOR_GROUND: "the disclosure ground does not reach this field (policy 3)",
    SENSITIVE: "sensitive data goes only under a rule that names its category explicitly",
    OUT_OF_SCOPE: "data outside the policy's scope goes only under a rule that names it explicitly",
}
# When several rules could have carried a field, the reported reason is the most telling.
_REASON_RANK = [
    NO_RULE,
    GRANT_ENDED,
    EXCLUDED,
    OUT_OF_SCOPE,
    SENSITIVE,
    CONSENT_MISSING,
    SENSITIVE_CONSENT_MISSING,
    RETENTION_EXPIRED,
]


def is_cookie(category: str) -> bool:
    """Policy 5 covers every `user.device.cookie*` category."""
    return category.startswith("user.device.cookie")


def covers(prefix: str, key: str) -> bool:
    """A taxonomy key covers itself and its children: `user.contact` covers `user.contact.email`."""
    return key == prefix or key.startswith(prefix + ".")


@dataclass(frozen=True, slots=True)
class Recipient:
    id: str
    region: str
    company: str
    contact: str


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    recipient: str
    purposes: tuple[str, ...]
    legal_basis: str
    categories: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    requires_consent: bool = False
    retention_days: int | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """A third party's time-bound access to listed categories of listed users (policy 2a)."""

    id: str
    recipient: str
    purpose: str
    legal_basis: str
    categories: tuple[str, ...]
    ends_at: float
    revoked_at: float | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and now < self.ends_at

    def as_rule(self) -> Rule:
        return Rule(f"grant:{self.id}", self.recipient, (self.purpose,), self.legal_basis, self.categories)


@dataclass(frozen=True, slots=True)
class Permits:
    """What one user has agreed to and been granted: the per-user inputs of a plan."""

    consented_rules: frozenset[str] = frozenset()
    sensitive_rules: frozenset[str] = frozenset()
    cookies: bool = False
    active_grants: tuple[Grant, ...] = ()
    ended_grants: tuple[Grant, ...] = ()


NO_PERMITS = Permits()


@dataclass(frozen=True, slots=True)
class Allowed:
    rule: Rule
    recipient: Recipient


@dataclass(frozen=True, slots=True)
class Withheld:
    reason: str

    @property
    def detail(self) -> str:
        return REASON_TEXT[self.reason]


Decision = Allowed | Withheld


@dataclass(frozen=True)
class Plan:
    """Every schema field's decision for one destination and purpose."""

    destination: str
    purpose: str | None
    decisions: dict[str, Decision]
    # Derived facts callers work out once per plan (e.g. a copy's log description per field set).
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def project(self, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Withheld]]:
        """Splits a record's fields into those that may go and those withheld (with why)."""
        sent: dict[str, Any] = {}
        withheld: dict[str, Withheld] = {}
        for name, value in values.items():
            d = self.decisions[name]
            if isinstance(d, Allowed):
                sent[name] = value
            else:
                withheld[name] = d
        return sent, withheld


@dataclass(frozen=True)
class RuleSet:
    home_region: str
    recipients: dict[str, Recipient]
    rules: tuple[Rule, ...]
    never_transfer: tuple[str, ...]
    version: str
    schema: Schema
    source: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def regions(self) -> frozenset[str]:
        return frozenset({self.home_region, *(r.region for r in self.recipients.values())})

    def destinations(self) -> list[str]:
        """Affiliate regions that some rule could send data to."""
        return sorted({self.recipients[r.recipient].region for r in self.rules})

    def plan(self, destination: str, purpose: str | None = None, permits: Permits = NO_PERMITS) -> Plan:
        """Decides each field for `destination`; `purpose` None means for any rule's purpose
        (replication); `permits` are the user's consents and grants."""
        key = (destination, purpose, permits)
        plan = self._cache.get(key)
        if plan is None:
            plan = Plan(
                destination,
                purpose,
                {
                    name: self._decide(spec, destination, purpose, permits)
                    for name, spec in self.schema.fields.items()
                },
            )
            if len(self._cache) > 10_000:  # per-user grants make many keys possible
                self._cache.clear()
            self._cache[key] = plan
        return plan

    def consent_rules(self, purpose: str, recipient: str) -> list[Rule]:
        """The consent-gated rules a consent for (`purpose`, `recipient`) satisfies: same
        recipient, and the consented purpose covers one of the rule's purposes."""
        return [
            r
            for r in self.rules
            if r.requires_consent and r.recipient == recipient and any(covers(purpose, p) for p in r.purposes)
        ]

    def _decide(self, spec: FieldSpec, destination: str, purpose: str | None, permits: Permits) -> Decision:
        if spec.credential:
            return Withheld(CREDENTIAL)
        if any(covers(p, spec.category) for p in self.never_transfer):
            return Withheld(NEVER_TRANSFER)
        if destination == self.home_region:
            # Data coming home is not a transfer abroad; the home region holds everything.
            return Allowed(_HOME_RULE, _HOME_RECIPIENT)
        if is_cookie(spec.category) and not permits.cookies:
            return Withheld(COOKIE_CONSENT_MISSING)
        best = NO_RULE
        candidates = [(r, False) for r in self.rules]
        candidates += [(g.as_rule(), True) for g in permits.active_grants]
        candidates += [(g.as_rule(), None) for g in permits.ended_grants]
        for rule, granted in candidates:
            recipient = self.recipients.get(rule.recipient)
            if recipient is None or recipient.region != destination:
                continue
            if purpose is not None and not any(covers(p, purpose) for p in rule.purposes):
                continue
            if not any(covers(c, spec.category) for c in rule.categories):
                continue
            reason = None
            if granted is None:
                reason = GRANT_ENDED
            elif any(covers(x, spec.category) for x in rule.exclude):
                reason = EXCLUDED
            elif spec.sensitive and spec.category not in rule.categories:
                reason = SENSITIVE
            elif spec.out_of_scope and spec.category not in rule.categories:
                reason = OUT_OF_SCOPE
            elif rule.requires_consent and rule.id not in permits.consented_rules:
                reason = CONSENT_MISSING
            elif spec.sensitive and rule.legal_basis == "consent" and rule.id not in permits.sensitive_rules:
                reason = SENSITIVE_CONSENT_MISSING
            if reason is None:
                return Allowed(rule, recipient)
            if _REASON_RANK.index(reason) > _REASON_RANK.index(best):
                best = reason
        return Withheld(best)


_HOME_RULE = Rule("home", "home", (), "contract", ())
_HOME_RECIPIENT = Recipient("home", "", "", "")


def load_rules(path: str | Path, schema: Schema) -> RuleSet:
    """Loads and validates a rules file. Every problem is reported at once, naming the
    file, line and rule."""
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
    errors: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a rules file is a mapping")
    home = doc.get("home_region")
    if not isinstance(home, str) or not home:
        errors.append(f"{where}: home_region is required")
    cats, uses = data_categories(), data_uses()
    recipients: dict[str, Recipient] = {}
    for i, raw in enumerate(doc.get("recipients") or []):
        try:
            r = Recipient(str(raw["id"]), str(raw["region"]), str(raw["company"]), str(raw["contact"]))
        except (KeyError, TypeError):
            errors.append(f"{where}: recipients[{i}] needs id, region, company and contact")
            continue
        if r.id in recipients:
            errors.append(f"{where}: recipients[{i}]: duplicate recipient id {r.id!r}")
        if r.region == home:
            errors.append(f"{where}: recipient {r.id!r} is in the home region; it is not a transfer")
        recipients[r.id] = r
    never = tuple(doc.get("never_transfer") or ())
    for c in never:
        if c not in cats:
            errors.append(f"{where}: never_transfer: {c!r} is not a Fides data category")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc.get("rules") or []):
        line = lines[i] if lines and i < len(lines) else 0
        rid = raw.get("id") if isinstance(raw, dict) else None
        at = f"{where}:{line}: rule {rid or i!r}"
        if not isinstance(raw, dict) or not rid:
            errors.append(f"{at}: a rule needs an id")
            continue
        if rid in seen:
            errors.append(f"{at}: duplicate rule id")
        seen.add(rid)
        extra = set(raw) - {
            "id",
            "recipient",
            "purposes",
            "legal_basis",
            "categories",
            "exclude",
            "requires_consent",
            "retention_days",
        }
        if extra:
            errors.append(f"{at}: unknown key(s) {sorted(extra)}")
        if raw.get("recipient") not in recipients:
            errors.append(f"{at}: unknown recipient {raw.get('recipient')!r}")
        purposes = tuple(raw.get("purposes") or ())
        if not purposes:
            errors.append(f"{at}: purposes must list at least one Fides data use")
        errors += [f"{at}: {p!r} is not a Fides data use" for p in purposes if p not in uses]
        categories = tuple(raw.get("categories") or ())
        if not categories:
            errors.append(f"{at}: categories must list at least one Fides data category")
        exclude = tuple(raw.get("exclude") or ())
        errors += [f"{at}: {c!r} is not a Fides data category" for c in categories + exclude if c not in cats]
        basis = raw.get("legal_basis")
        if basis not in LEGAL_BASES:
            errors.append(f"{at}: legal_basis must be one of {sorted(LEGAL_BASES)}")
        matchable = [
            s.name
            for s in schema.fields.values()
            if any(covers(c, s.category) for c in categories)
            and not any(covers(x, s.category) for x in exclude)
            and not any(covers(n, s.category) for n in never)
            and not s.credential
        ]
        if categories and not matchable:
            errors.append(f"{at}: can never match: no schema field falls under its categories")
        retention = raw.get("retention_days")
        if retention is not None and (not isinstance(retention, int) or retention <= 0):
            errors.append(f"{at}: retention_days must be a positive whole number")
        rules.append(
            Rule(
                id=str(rid),
                recipient=str(raw.get("recipient")),
                purposes=purposes,
                legal_basis=str(basis),
                categories=categories,
                exclude=exclude,
                requires_consent=bool(raw.get("requires_consent", False)) or basis == "consent",
                retention_days=retention,
                line=line,
            )
        )
    if errors:
        raise ConfigError("\n".join(errors))
    return RuleSet(str(home), recipients, tuple(rules), never, version, schema, where)
