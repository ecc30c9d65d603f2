"""Transfer rules: what may leave the home region, to whom, for what, on which legal basis.

Evaluation is pure and default-deny. For a destination region and a purpose, `RuleSet.plan`
decides every schema field once (cached); projecting a record is then a dictionary filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, get_args

from residency.server.core.schema import FieldSpec, Schema

LegalBasis = Literal[
    "consent",
    "contract",
    "legal_obligation",
    "judicial_or_administrative_request",
    "violation_of_law_or_agreement",
    "ip_complaint",
    "transaction_dispute",
    "vital_interest",
    "public_interest",
]
LEGAL_BASES = frozenset(get_args(LegalBasis))

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
POLICY_MISSING = "policy_missing"
NOT_IN_FORM = "not_in_form"
FORM_MISMATCH = "form_mismatch"

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
    POLICY_MISSING: "the copy predates travelling policies; it is read once the primary sends it again",
    NOT_IN_FORM: "its rule sends it transformed, and this value cannot be put in that form",
    FORM_MISMATCH: "the copy's value is not in the form its signed policy names, so it is not served",
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


# How a transfer abroad is made lawful beside its legal basis (GDPR Art. 46, PIPL Art. 38):
# standard contractual clauses, the CAC standard contract (its filing number), a certification,
# an adequacy decision. A record of processing (`residency rules ropa`) lists them per rule.
SafeguardKind = Literal["scc", "cac_standard_contract", "certification", "adequacy"]


@dataclass(frozen=True, slots=True)
class Safeguard:
    kind: str
    reference: str


@dataclass(frozen=True, slots=True)
class Recipient:
    id: str
    region: str
    company: str
    contact: str
    # ISO 3166-1 alpha-2 code of the country the recipient's servers are in ("": not stated).
    country: str = ""


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
    safeguards: tuple[Safeguard, ...] = ()
    # (field, form) pairs: those fields go, and are served, only in that form (`core.transform`).
    transform: tuple[tuple[str, str], ...] = ()

    def form(self, field: str) -> str:
        """The form the rule sends `field` as; "" for its value."""
        return next((f for n, f in self.transform if n == field), "")


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
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

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

    @cached_property
    def _forms(self) -> dict[str, str]:
        return {n: f for n, d in self.decisions.items() if isinstance(d, Allowed) and (f := d.rule.form(n))}

    def forms(self, names: Any) -> dict[str, str]:
        """The form each of `names` goes in, for those a rule transforms (worked out once per
        plan: every projection asks)."""
        every = self._forms
        return {n: every[n] for n in names if n in every} if every else {}


@dataclass(frozen=True)
class RuleSet:
    home_region: str
    recipients: dict[str, Recipient]
    rules: tuple[Rule, ...]
    never_transfer: tuple[str, ...]
    version: str
    schema: Schema
    source: str = ""
    _cache: dict[tuple[str, str | None, Permits, bool], Plan] = field(
        default_factory=dict, repr=False, compare=False
    )

    @cached_property
    def regions(self) -> frozenset[str]:
        return frozenset({self.home_region, *(r.region for r in self.recipients.values())})

    def destinations(self) -> list[str]:
        """Affiliate regions that some rule could send data to."""
        return sorted({self.recipients[r.recipient].region for r in self.rules})

    def plan(
        self,
        destination: str,
        purpose: str | None = None,
        permits: Permits = NO_PERMITS,
        grants_only: bool = False,
    ) -> Plan:
        """Decides each field for `destination`; `purpose` None means for any rule's purpose
        (replication); `permits` are the user's consents and grants. `grants_only`: for a
        recipient's own read, which its grants alone decide (wherever it is, home included)."""
        key = (destination, purpose, permits, grants_only)
        plan = self._cache.get(key)
        if plan is None:
            plan = Plan(
                destination,
                purpose,
                {
                    name: self._decide(spec, destination, purpose, permits, grants_only)
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

    def _decide(
        self, spec: FieldSpec, destination: str, purpose: str | None, permits: Permits, grants_only: bool
    ) -> Decision:
        if spec.credential:
            return Withheld(CREDENTIAL)
        if any(covers(p, spec.category) for p in self.never_transfer):
            return Withheld(NEVER_TRANSFER)
        if destination == self.home_region and not grants_only:
            # Data coming home is not a transfer abroad; the home region holds everything.
            return Allowed(_HOME_RULE, _HOME_RECIPIENT)
        if is_cookie(spec.category) and not permits.cookies:
            return Withheld(COOKIE_CONSENT_MISSING)
        best = NO_RULE
        # (rule, granted): False for a rule, True for an active grant, None for an ended one.
        candidates: list[tuple[Rule, bool | None]] = [] if grants_only else [(r, False) for r in self.rules]
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
