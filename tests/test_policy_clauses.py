"""The privacy policy's clauses as pure decisions (`residency.server.core.policy`), without a
server: consent (2a, 2c), grants (2a), disclosure (3a-g), cookies (5), erasure and retention
(6b, 2a). tests/test_policy.py checks the same clauses end to end."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from residency.server.config.rules import parse_rules
from residency.server.config.schema import load_schema
from residency.server.core.errors import CallerDenied, FailedPrecondition, InvalidRecord, PolicyDenied
from residency.server.core.policy import consent, cookies, disclosure, erasure, grants
from residency.server.core.policy.consent import ConsentChange, StandingConsent
from residency.server.core.policy.disclosure import GROUNDS, REQUEST_LIFETIME, Disclosure, Request
from residency.server.core.policy.grants import GrantRequest
from residency.server.core.rules import (
    CREDENTIAL,
    LEGAL_BASES,
    NO_PERMITS,
    NOT_FOR_GROUND,
    Grant,
    RuleSet,
)
from residency.server.core.schema import Schema
from residency.server.deployment import EXAMPLE_RULES, EXAMPLE_SCHEMA

NOW = 1_800_000_000.0
DAY = 86400


def _example_schema() -> Schema:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "schema.yaml"
        p.write_text(EXAMPLE_SCHEMA)
        return load_schema(p)


_SCHEMA = _example_schema()
_FIELDS = sorted(_SCHEMA.fields)


@pytest.fixture(scope="module")
def schema() -> Schema:
    return _SCHEMA


@pytest.fixture(scope="module")
def rules(schema: Schema) -> RuleSet:
    return parse_rules(yaml.safe_load(EXAMPLE_RULES), schema, "rules.yaml", "v1")


def _paths(e: pytest.ExceptionInfo[InvalidRecord]) -> list[str]:
    return [path for path, _ in e.value.violations]


# ---- consent (2a, 2c) -----------------------------------------------------------------------


def test_a_consent_batch_names_every_bad_field_at_once(rules: RuleSet):
    changes = [
        ConsentChange("u-1", "marketing.communications", "ie-affiliate", False, "signed form"),
        ConsentChange("bad id!", "not.a.use", "nobody", False, "x" * 2001),
    ]
    with pytest.raises(InvalidRecord) as e:
        consent.check_consents(changes, rules.recipients)
    assert _paths(e) == [
        "consents[1].user_id",
        "consents[1].purpose",
        "consents[1].recipient",
        "consents[1].evidence",
    ]
    assert "known: ['ie-affiliate', 'sg-affiliate']" in str(e.value)


def test_an_undeclared_recipient_is_accepted_only_for_third_party_sharing(rules: RuleSet):
    consent.check_consents(
        [ConsentChange("u-1", "third_party_sharing", "Acme Law LLP", False, "signed form")], rules.recipients
    )
    with pytest.raises(InvalidRecord) as e:
        consent.check_consents(
            [ConsentChange("u-1", "marketing.communications", "Acme Law LLP", False, "signed form")],
            rules.recipients,
        )
    assert _paths(e) == ["consents[0].recipient"]


@pytest.mark.parametrize("count", [0, 1001])
def test_an_empty_or_oversized_consent_batch_is_refused(rules: RuleSet, count: int):
    with pytest.raises(InvalidRecord) as e:
        consent.check_consents(
            [ConsentChange("u-1", "essential.service", "", False, "signed form")] * count, rules.recipients
        )
    assert _paths(e) == ["consents"]


def test_a_consent_without_evidence_is_refused_but_a_withdrawal_needs_none(rules: RuleSet):
    changes = [
        ConsentChange("u-1", "marketing.communications", "ie-affiliate", False, "signup form v3, box 2"),
        ConsentChange("u-2", "marketing.communications", "ie-affiliate", False, ""),
        ConsentChange("u-3", "marketing.communications", "ie-affiliate", False, " \t"),
    ]
    with pytest.raises(InvalidRecord) as e:
        consent.check_consents(changes, rules.recipients)
    assert _paths(e) == ["consents[1].evidence", "consents[2].evidence"]
    assert "say how the user gave this consent" in str(e.value)
    consent.check_consents(changes, rules.recipients, withdraw=True)


def test_a_marketing_consent_enables_only_its_recipients_consent_rules(rules: RuleSet):
    got = consent.consented_rules(
        rules,
        ["u-1", "u-2", "u-3"],
        [
            StandingConsent("u-1", "marketing.communications", "ie-affiliate", False),
            StandingConsent("u-2", "marketing.communications", "sg-affiliate", False),
            StandingConsent("u-3", "marketing", "ie-affiliate", False),  # a broader purpose covers it
        ],
    )
    assert got["u-1"].rules == {"ie-marketing"} and not got["u-1"].sensitive_rules
    assert got["u-2"].rules == set()
    assert got["u-3"].rules == {"ie-marketing"}


def test_a_sensitive_consent_enables_rules_apart_from_the_plain_one(rules: RuleSet):
    got = consent.consented_rules(
        rules, ["u-1"], [StandingConsent("u-1", "marketing.communications", "ie-affiliate", True)]
    )
    assert got["u-1"].sensitive_rules == {"ie-marketing"} and got["u-1"].rules == set()


def test_sharing_under_consent_needs_a_consent_naming_that_third_party():
    held = [StandingConsent("u-1", "third_party_sharing", "Acme Law LLP", False)]
    assert consent.shares_with(held, "Acme Law LLP")
    assert consent.shares_with(
        [StandingConsent("u-1", "third_party_sharing.legal_obligation", "Acme", False)], "Acme"
    )
    assert not consent.shares_with(held, "Other Co")
    assert not consent.shares_with(
        [StandingConsent("u-1", "marketing", "Acme Law LLP", False)], "Acme Law LLP"
    )


def test_a_consent_change_is_logged_as_granted_or_withdrawn_with_its_kind():
    assert (
        consent.change_reason(ConsentChange("u-1", "marketing", "ie-affiliate", False, ""), False)
        == "granted"
    )
    assert (
        consent.change_reason(ConsentChange("u-1", "functional.storage", "", True, ""), True)
        == "withdrawn (sensitive personal information) (cookies, policy 5)"
    )


# ---- grants (2a) ----------------------------------------------------------------------------


def _grant(**kw: object) -> GrantRequest:
    g = {
        "recipient": "sg-affiliate",
        "purpose": "essential.service",
        "legal_basis": "contract",
        "categories": ("user.contact",),
        "ends_at": NOW + DAY,
        "user_ids": ("u-1",),
    }
    return GrantRequest(**(g | kw))


def test_a_well_formed_grant_to_a_declared_recipient_is_accepted(rules: RuleSet):
    grants.check_grant(_grant(), rules.recipients, rules.never_transfer, NOW)


def test_a_grant_to_an_undeclared_third_party_is_refused_naming_every_problem(rules: RuleSet):
    bad = _grant(
        recipient="Acme", purpose="x", legal_basis="whim", categories=(), ends_at=NOW, user_ids=("bad id!",)
    )
    with pytest.raises(InvalidRecord) as e:
        grants.check_grant(bad, rules.recipients, rules.never_transfer, NOW)
    assert _paths(e) == [
        "grant.recipient",
        "grant.purpose",
        "grant.legal_basis",
        "grant.categories",
        "grant.user_ids",
        "grant.ends_at",
    ]
    assert "declared in the rules file with its company and contact" in str(e.value)


@pytest.mark.parametrize(
    ("category", "kept"),
    [("user.government_id", "user.government_id"), ("user.authorization.password", "user.authorization")],
)
def test_a_grant_for_a_never_transfer_category_is_refused_at_creation(
    rules: RuleSet, category: str, kept: str
):
    assert kept in rules.never_transfer
    with pytest.raises(InvalidRecord) as e:
        grants.check_grant(
            _grant(categories=("user.contact", category)), rules.recipients, rules.never_transfer, NOW
        )
    assert _paths(e) == ["grant.categories"]
    assert f"{category} never leaves the home region (never_transfer: {kept})" in str(e.value)
    # A broader category is no claim on what never leaves: its never-transfer fields are withheld.
    grants.check_grant(_grant(categories=("user",)), rules.recipients, rules.never_transfer, NOW)


def test_a_grant_stands_until_its_end_and_never_after_revocation():
    standing = Grant("b", "sg-affiliate", "essential.service", "contract", ("user.name",), NOW + 1)
    other = Grant("a", "sg-affiliate", "essential.service", "contract", ("user.name",), NOW + 1)
    over = Grant("c", "sg-affiliate", "essential.service", "contract", ("user.name",), NOW)
    revoked = Grant("d", "sg-affiliate", "essential.service", "contract", ("user.name",), NOW + DAY, NOW - 1)
    active, ended = grants.split_grants([standing, over, revoked, other], NOW)
    assert [g.id for g in active] == ["a", "b"]
    assert [g.id for g in ended] == ["c", "d"]


def test_a_grant_is_listed_as_active_ended_or_revoked_against_now():
    assert grants.state(NOW + 1, None, NOW) == "active"
    assert grants.state(NOW, None, NOW) == "ended"  # the end time is the first instant it is over
    assert grants.state(NOW + DAY, NOW - 1, NOW) == "revoked"
    assert grants.state(NOW - DAY, NOW - 1, NOW) == "ended"  # revoked after it had already ended


def test_a_grant_is_logged_with_its_end_and_how_it_closed():
    assert (
        grants.opened_reason("essential.service", 0)
        == "grant opened for essential.service until 1970-01-01T00:00:00Z"
    )
    assert grants.closed_reason(True) == "grant revoked: reads denied, copies withdrawn"
    assert grants.closed_reason(False) == "grant ended: reads denied, copies withdrawn"


# ---- disclosure (3a-g) ----------------------------------------------------------------------


def test_every_ground_of_policy_3_stands_on_a_known_legal_basis():
    assert len(GROUNDS) == 7  # 3a to 3g
    assert all(g.legal_basis in LEGAL_BASES for g in GROUNDS.values())


def test_ip_complaint_reaches_only_name_and_contact(schema: Schema):
    assert {n for n, s in schema.fields.items() if disclosure.reaches("ip_complaint", s)} == {
        "name",
        "phone",
        "email",
        "address",
    }


def test_transaction_dispute_reaches_only_name_and_contact(schema: Schema):
    reached = {n for n, s in schema.fields.items() if disclosure.reaches("transaction_dispute", s)}
    assert reached == {"name", "phone", "email", "address"}


@pytest.mark.parametrize("ground", sorted(GROUNDS))
def test_no_ground_ever_reaches_a_credential(schema: Schema, ground: str):
    assert not disclosure.reaches(ground, schema.fields["password"])


def test_a_ground_without_its_evidence_is_refused_naming_what_is_missing():
    d = Disclosure("u-1", "Court", "SG", "judicial_or_administrative_request", [], {"reference": " "})
    assert (
        disclosure.refusal(d, False) == "ground judicial_or_administrative_request needs evidence: reference"
    )


def test_disclosure_under_consent_needs_the_users_standing_sharing_consent():
    d = Disclosure("u-1", "Acme", "SG", "consent", [])
    assert disclosure.refusal(d, False) == (
        "the user has no standing consent to share with Acme (third_party_sharing)"
    )
    assert disclosure.refusal(d, True) == ""


REQUESTER = "spiffe://residency/service/cn-north/billing"


def _request(state: str = disclosure.REQUESTED) -> Request:
    d = Disclosure("u-1", "Court", "CN", "judicial_or_administrative_request", [], {"reference": "R-1"})
    return Request(
        "0" * 32, d, "third_party_sharing.legal_obligation", REQUESTER, NOW, NOW + REQUEST_LIFETIME, state
    )


@pytest.mark.parametrize(
    ("approver", "name"),
    [
        (REQUESTER, "billing"),  # the requester itself
        ("spiffe://residency/approver/cn-north/billing", "billing"),  # its holder under another role
        ("spiffe://residency/approver/ap-southeast-1/billing", "billing"),
    ],
)
def test_the_requester_never_approves_its_own_disclosure(approver: str, name: str):
    refused = disclosure.decision_refusal(_request(), approver, name, "billing", NOW)
    assert isinstance(refused, CallerDenied) and "two-person rule" in str(refused)


def test_another_person_approves_a_waiting_request_and_only_a_waiting_one():
    wang = "spiffe://residency/approver/cn-north/wang"
    assert disclosure.decision_refusal(_request(), wang, "wang", "billing", NOW) is None
    for state in (disclosure.APPROVED, disclosure.DENIED, disclosure.RELEASED):
        refused = disclosure.decision_refusal(_request(state), wang, "wang", "billing", NOW)
        assert isinstance(refused, FailedPrecondition), state
    late = disclosure.decision_refusal(_request(), wang, "wang", "billing", NOW + REQUEST_LIFETIME)
    assert isinstance(late, FailedPrecondition) and "expired" in str(late)


def test_only_the_requester_receives_an_approved_disclosure_before_it_expires():
    approved = _request(disclosure.APPROVED)
    assert disclosure.release_refusal(approved, REQUESTER, NOW) is None
    other = disclosure.release_refusal(approved, "spiffe://residency/service/cn-north/other", NOW)
    assert isinstance(other, CallerDenied)
    waiting = disclosure.release_refusal(_request(), REQUESTER, NOW)
    assert isinstance(waiting, FailedPrecondition) and "ApproveDisclosure" in str(waiting)
    for state in (disclosure.DENIED, disclosure.RELEASED):
        assert isinstance(disclosure.release_refusal(_request(state), REQUESTER, NOW), FailedPrecondition)
    assert disclosure.state_at(approved, NOW + REQUEST_LIFETIME - 1) == disclosure.APPROVED
    assert disclosure.state_at(approved, NOW + REQUEST_LIFETIME) == disclosure.EXPIRED
    assert isinstance(
        disclosure.release_refusal(approved, REQUESTER, NOW + REQUEST_LIFETIME), FailedPrecondition
    )


@pytest.mark.parametrize("given", ["", "0" * 31, "0" * 33, "A" * 32, "../" + "0" * 29, "g" * 32])
def test_a_disclosure_request_id_that_was_never_issued_is_invalid(given: str):
    with pytest.raises(InvalidRecord) as e:
        disclosure.check_id(given)
    assert _paths(e) == ["id"]


def test_each_step_logs_the_request_its_ground_evidence_and_actors_but_no_value():
    r = _request()
    r.decided_by = "spiffe://residency/approver/cn-north/wang"
    assert disclosure.evidence_of(r, "approve") == {
        "request": "0" * 32,
        "step": "approve",
        "ground": "judicial_or_administrative_request",
        "reference": "R-1",
        "fields_asked": [],
        "requester": REQUESTER,
        "approver": "spiffe://residency/approver/cn-north/wang",
    }


def test_a_disclosure_hands_over_what_its_ground_reaches_and_says_why_not_the_rest(schema: Schema):
    values = {"name": "n", "email": "e", "password": "p", "ip_address": "i"}
    d = Disclosure("u-1", "Rights Holder", "SG", "ip_complaint", ["name", "password", "ip_address", "phone"])
    sent, withheld = disclosure.select(d, values, schema.fields, "")
    assert sent == {"name": "n"}  # phone was asked for but the record has none
    assert {n: w.reason for n, w in withheld.items()} == {
        "password": CREDENTIAL,
        "ip_address": NOT_FOR_GROUND,
    }


def test_a_disclosure_naming_no_fields_considers_every_field_held(schema: Schema):
    values = {"name": "n", "ip_address": "i"}
    sent, _ = disclosure.select(
        Disclosure("u-1", "Buyer", "SG", "requested_service", []), values, schema.fields, ""
    )
    assert sent == values


def test_a_refused_disclosure_hands_over_nothing(schema: Schema):
    values = {"name": "n", "password": "p"}
    sent, withheld = disclosure.select(
        Disclosure("u-1", "Acme", "SG", "consent", []), values, schema.fields, "refused"
    )
    assert sent == {}
    assert {n: w.reason for n, w in withheld.items()} == {"name": NOT_FOR_GROUND, "password": CREDENTIAL}


@pytest.mark.parametrize(
    ("d", "path"),
    [
        (Disclosure("u-1", "Acme", "SG", "whim", []), "ground"),
        (Disclosure("u-1", "  ", "SG", "consent", []), "third_party"),
        (Disclosure("u-1", "Acme", "SG", "consent", ["shoe_size"]), "fields[shoe_size]"),
    ],
)
def test_a_disclosure_with_an_unknown_ground_field_or_no_third_party_is_invalid(
    schema: Schema, d: Disclosure, path: str
):
    with pytest.raises(InvalidRecord) as e:
        disclosure.check_request(d, schema.fields)
    assert _paths(e) == [path]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("", "name the country the third party receives the data in"),
        ("  ", "name the country the third party receives the data in"),
        ("sg", "did you mean SG?"),
        ("Singapore", "did you mean SG?"),
        ("SGP", "did you mean SG?"),
        ("XX", "(two upper-case letters, e.g. SG)"),
    ],
)
def test_a_disclosure_names_its_country_as_an_iso_3166_alpha_2_code(schema: Schema, given: str, says: str):
    disclosure.check_request(Disclosure("u-1", "Acme", "US", "consent", []), schema.fields)
    with pytest.raises(InvalidRecord) as e:
        disclosure.check_request(Disclosure("u-1", "Acme", given, "consent", []), schema.fields)
    assert _paths(e) == ["destination_country"] and says in str(e.value)


def test_a_disclosure_is_logged_with_its_ground_and_evidence_or_its_refusal():
    d = Disclosure("u-1", "Court", "SG", "ip_complaint", [], {"reference": "case 7", "approver": ""})
    assert disclosure.log_reason(d, "") == "policy 3, ground ip_complaint; reference case 7"
    assert disclosure.log_reason(d, "no") == "no"
    err = disclosure.refusal_error("no", 42)
    assert isinstance(err, FailedPrecondition) and str(err) == "no (transfer-log entry 42)"


# ---- cookies (5) ----------------------------------------------------------------------------


def test_cookie_consent_is_a_functional_storage_consent_naming_no_recipient():
    assert cookies.is_cookie_consent("functional.storage", "")
    assert cookies.is_cookie_consent("functional", "")  # a broader purpose covers it
    assert not cookies.is_cookie_consent("functional.storage", "ie-affiliate")
    assert not cookies.is_cookie_consent("marketing", "")


def test_the_schemas_cookie_fields_are_its_cookie_categories(schema: Schema):
    assert schema.cookie_fields == {"cookie_id"}


def test_cookie_writes_for_users_without_cookie_consent_are_refused(schema: Schema):
    refusal = cookies.refused_cookie_writes(["u-2", "u-1", "u-3"], {"u-1"}, schema.cookie_fields)
    assert isinstance(refusal, PolicyDenied)
    assert str(refusal) == (
        "policy 5: 2 user(s) have not accepted cookies (first: u-2); "
        "cookie fields (cookie_id) are not collected without cookie consent"
    )
    assert cookies.refused_cookie_writes(["u-1"], {"u-1"}, schema.cookie_fields) is None


# ---- erasure and retention (6b, 2a) ---------------------------------------------------------


def test_a_field_is_withheld_only_once_its_rules_retention_has_passed(rules: RuleSet):
    plan = rules.plan("eu-west-1", None, NO_PERMITS)  # ie-analytics keeps 180 days, ie-support 365
    sent = ["language", "email"]
    assert erasure.expired_fields(plan.decisions, sent, NOW, NOW + 180 * DAY) == []
    assert erasure.expired_fields(plan.decisions, sent, NOW, NOW + 200 * DAY) == ["language"]
    assert erasure.expired_fields(plan.decisions, sent, NOW, NOW + 400 * DAY) == ["language", "email"]


def test_data_at_home_never_expires(rules: RuleSet):
    plan = rules.plan(rules.home_region, None, NO_PERMITS)
    assert erasure.expired_fields(plan.decisions, ["email", "language"], 0, NOW) == []


def test_the_retention_sweep_looks_once_at_each_distinct_period_shortest_first(rules: RuleSet):
    assert erasure.retention_cutoffs(rules.rules, NOW) == [
        (90, NOW - 90 * DAY),
        (180, NOW - 180 * DAY),
        (365, NOW - 365 * DAY),
    ]


def test_withdrawing_cookie_consent_erases_the_cookie_fields_and_nothing_else_does(schema: Schema):
    assert erasure.removed_on_withdrawal("functional.storage", "", schema.cookie_fields) == ("cookie_id",)
    assert (
        erasure.removed_on_withdrawal("marketing.communications", "ie-affiliate", schema.cookie_fields) == ()
    )
    assert erasure.removed_on_withdrawal("functional.storage", "sg-affiliate", schema.cookie_fields) == ()


@given(
    ground=st.sampled_from(sorted(GROUNDS)),
    held=st.sets(st.sampled_from(_FIELDS)),
    asked=st.lists(st.sampled_from(_FIELDS), unique=True),
    refused=st.sampled_from(["", "refused"]),
)
def test_a_disclosure_sends_only_what_its_ground_reaches_and_accounts_for_every_held_field(
    ground: str, held: set[str], asked: list[str], refused: str
):
    fields = _SCHEMA.fields
    d = Disclosure("u-1", "Acme", "SG", ground, asked)
    sent, withheld = disclosure.select(d, {n: n for n in held}, fields, refused)
    assert set(sent) | set(withheld) == (set(asked) if asked else held) & held
    assert not set(sent) & set(withheld)
    assert all(disclosure.reaches(ground, fields[n]) for n in sent)
    assert not (refused and sent)
    assert all(w.reason == CREDENTIAL for n, w in withheld.items() if fields[n].credential)
