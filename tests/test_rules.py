"""Rule evaluation (pure): default deny, never_transfer, exclusions, explicit categories."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from residency.server.config.rules import load_rules, parse_rules
from residency.server.config.schema import load_schema
from residency.server.core.errors import ConfigError
from residency.server.core.rules import (
    CONSENT_MISSING,
    COOKIE_CONSENT_MISSING,
    CREDENTIAL,
    EXCLUDED,
    GRANT_ENDED,
    NEVER_TRANSFER,
    NO_PERMITS,
    NO_RULE,
    OUT_OF_SCOPE,
    SENSITIVE,
    SENSITIVE_CONSENT_MISSING,
    Allowed,
    Grant,
    Permits,
    Withheld,
    covers,
)
from residency.server.core.schema import Schema, data_categories
from residency.server.deployment import EXAMPLE_RULES, EXAMPLE_SCHEMA


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> Schema:
    p = tmp_path_factory.mktemp("s") / "schema.yaml"
    p.write_text(EXAMPLE_SCHEMA)
    return load_schema(p)


def rules_doc(**over) -> dict:
    doc = yaml.safe_load(EXAMPLE_RULES)
    doc.update(over)
    return doc


def sent_to(rules, region: str, permits: Permits = NO_PERMITS, purpose: str | None = None) -> set[str]:
    return {n for n, d in rules.plan(region, purpose, permits).decisions.items() if isinstance(d, Allowed)}


def test_the_example_rules_send_each_affiliate_a_different_subset(schema):
    rules = parse_rules(rules_doc(), schema, "rules.yaml", "v")
    cookies = Permits(cookies=True)
    sent = {r: sent_to(rules, r, cookies) for r in ("ap-southeast-1", "eu-west-1")}
    assert sent["ap-southeast-1"] == {
        "name",
        "phone",
        "email",
        "ip_address",
        "browser_type",
        "hardware_software",
        "cookie_id",
        "language",
    }
    assert sent["eu-west-1"] == {"language", "visit_time", "pages_visited", "email", "transactions"}
    d = rules.plan("ap-southeast-1").decisions
    assert d["cookie_id"] == Withheld(COOKIE_CONSENT_MISSING)  # policy 5: no cookie consent, no cookie data
    assert d["national_id"] == Withheld(NEVER_TRANSFER)
    assert d["password"] == Withheld(CREDENTIAL)
    assert d["address"] == Withheld(EXCLUDED)
    assert d["search_keywords"] == Withheld(NEVER_TRANSFER)


def test_default_deny_for_a_region_without_rules(schema):
    rules = parse_rules(rules_doc(rules=[]), schema, "rules.yaml", "v")
    assert all(isinstance(d, Withheld) for d in rules.plan("ap-southeast-1").decisions.values())


def test_sensitive_and_out_of_scope_fields_need_their_category_named(schema):
    doc = rules_doc(
        never_transfer=[],
        rules=[
            {
                "id": "broad",
                "recipient": "sg-affiliate",
                "purposes": ["essential.service"],
                "legal_basis": "contract",
                "categories": ["user"],
            },
        ],
    )
    d = parse_rules(doc, schema, "rules.yaml", "v").plan("ap-southeast-1").decisions
    assert d["national_id"] == Withheld(SENSITIVE)
    assert d["search_keywords"] == Withheld(OUT_OF_SCOPE)
    assert d["violation_records"] == Withheld(SENSITIVE)
    assert isinstance(d["email"], Allowed)
    doc["rules"][0]["categories"] = ["user", "user.behavior.search_history"]
    d = parse_rules(doc, schema, "rules.yaml", "v").plan("ap-southeast-1").decisions
    assert isinstance(d["search_keywords"], Allowed)


def test_purpose_must_match_for_reads(schema):
    rules = parse_rules(rules_doc(), schema, "rules.yaml", "v")
    assert isinstance(
        rules.plan("ap-southeast-1", "essential.service.authentication").decisions["email"], Allowed
    )
    assert rules.plan("ap-southeast-1", "marketing.communications").decisions["email"] == Withheld(NO_RULE)


def test_a_bad_rules_file_reports_every_error_with_line_and_rule(schema, tmp_path):
    text = EXAMPLE_RULES.replace(
        "legal_basis: contract\n    categories: [user.demographic.language, user.telemetry",
        "legal_basis: because\n    categories: [user.nonsense, user.telemetry",
    )
    text = text.replace("purposes: [essential.service]\n", "purposes: [essential.everything]\n")
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_rules(p, schema)
    msg = str(e.value)
    assert f"{p}:17: rule 'sg-service': 'essential.everything' is not a Fides data use" in msg
    assert f"{p}:26: rule 'ie-analytics': legal_basis must be one of" in msg
    assert "'user.nonsense' is not a Fides data category" in msg


def test_duplicate_ids_unknown_recipient_and_rules_that_never_match_are_errors(schema):
    doc = rules_doc()
    doc["rules"].append(dict(doc["rules"][0]))
    doc["rules"].append(
        {
            "id": "ghost",
            "recipient": "nobody",
            "purposes": ["essential.service"],
            "legal_basis": "contract",
            "categories": ["user.government_id"],
        }
    )
    with pytest.raises(ConfigError) as e:
        parse_rules(doc, schema, "rules.yaml", "v")
    msg = str(e.value)
    assert "rule 'sg-service': duplicate rule id" in msg
    assert "rule 'ghost': unknown recipient 'nobody'" in msg
    assert "rule 'ghost': can never match" in msg


CATEGORIES = sorted(c for c in data_categories() if c.startswith("user."))


@settings(max_examples=200, deadline=None)
@given(
    rule_cats=st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=4),
    exclude=st.lists(st.sampled_from(CATEGORIES), max_size=2),
    never=st.lists(st.sampled_from(CATEGORIES), max_size=2),
)
def test_never_transfer_and_exclude_always_win_and_decisions_are_stable(schema, rule_cats, exclude, never):
    doc = rules_doc(
        never_transfer=never,
        rules=[
            {
                "id": "r",
                "recipient": "sg-affiliate",
                "purposes": ["essential.service"],
                "legal_basis": "contract",
                "categories": rule_cats,
                "exclude": exclude,
            }
        ],
    )
    try:
        rules = parse_rules(doc, schema, "rules.yaml", "v")
    except ConfigError:
        return  # a rule that can never match is refused; nothing to evaluate
    plan = rules.plan("ap-southeast-1")
    again = parse_rules(doc, schema, "rules.yaml", "v").plan("ap-southeast-1")
    assert plan.decisions == again.decisions
    for name, d in plan.decisions.items():
        spec = schema.fields[name]
        if isinstance(d, Allowed):
            assert not spec.credential
            assert not any(covers(n, spec.category) for n in never)
            assert not any(covers(x, spec.category) for x in exclude)
            assert any(covers(c, spec.category) for c in rule_cats)
            if spec.sensitive or spec.out_of_scope:
                assert spec.category in rule_cats
    assert all(isinstance(d, Withheld) for d in rules.plan("eu-west-1").decisions.values())


def test_consent_gated_rules_send_only_with_the_users_consent(schema):
    rules = parse_rules(rules_doc(), schema, "rules.yaml", "v")
    assert rules.plan("eu-west-1").decisions["phone"] == Withheld(CONSENT_MISSING)
    [rule] = rules.consent_rules("marketing.communications", "ie-affiliate")
    assert rule.id == "ie-marketing"
    assert rules.consent_rules("marketing", "ie-affiliate") == [rule]  # a broader consent covers it
    assert rules.consent_rules("marketing.communications", "sg-affiliate") == []
    assert {"name", "phone"} <= sent_to(rules, "eu-west-1", Permits(consented_rules=frozenset({rule.id})))


def test_sensitive_data_under_consent_needs_a_separate_consent(schema):
    doc = rules_doc(
        rules=[
            {
                "id": "health",
                "recipient": "sg-affiliate",
                "purposes": ["essential.service"],
                "legal_basis": "consent",
                "categories": ["user.criminal_history"],
            }
        ]
    )
    rules = parse_rules(doc, schema, "rules.yaml", "v")
    general = Permits(consented_rules=frozenset({"health"}))
    assert rules.plan("ap-southeast-1", None, general).decisions["violation_records"] == Withheld(
        SENSITIVE_CONSENT_MISSING
    )
    both = Permits(consented_rules=frozenset({"health"}), sensitive_rules=frozenset({"health"}))
    assert "violation_records" in sent_to(rules, "ap-southeast-1", both)


def test_grants_allow_until_they_end_and_then_say_so(schema):
    rules = parse_rules(rules_doc(), schema, "rules.yaml", "v")
    g = Grant("g1", "sg-affiliate", "essential.service", "contract", ("user.behavior.browsing_history",), 2e9)
    assert "pages_visited" in sent_to(rules, "ap-southeast-1", Permits(active_grants=(g,)))
    assert rules.plan("ap-southeast-1", None, Permits(ended_grants=(g,))).decisions[
        "pages_visited"
    ] == Withheld(GRANT_ENDED)
    # A grant never opens what never_transfer or credentials close.
    wide = Grant("g2", "sg-affiliate", "essential.service", "contract", ("user",), 2e9)
    sent = sent_to(rules, "ap-southeast-1", Permits(active_grants=(wide,)))
    assert not sent & {"national_id", "password", "search_keywords"}
