"""Countries as ISO 3166-1 alpha-2 codes (pycountry ships the ISO data): how a disclosure
names where the data goes, and the names reports count transfers abroad under."""

from __future__ import annotations

import pycountry


def is_alpha_2(code: str) -> bool:
    """Whether `code` is an assigned ISO 3166-1 alpha-2 code, written as ISO writes it: two
    upper-case letters ("SG"), so the log holds exactly what was asked for."""
    return (
        len(code) == 2
        and code.isascii()
        and code.isupper()
        and pycountry.countries.get(alpha_2=code) is not None
    )


def suggest(text: str) -> str:
    """The alpha-2 code of a country given in another form (a name, "sg", "SGP"), or ""."""
    try:
        return str(pycountry.countries.lookup(text.strip()).alpha_2)
    except LookupError:
        return ""


def name(code: str) -> str:
    """A country's short English name ("Singapore"; "Taiwan" rather than ISO's "Taiwan,
    Province of China"); an unassigned code is shown as given."""
    c = pycountry.countries.get(alpha_2=code)
    return code if c is None else str(getattr(c, "common_name", c.name))
