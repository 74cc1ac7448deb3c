"""What a party's name may be: one rule for certificates and plain-text identities."""

from __future__ import annotations

import re

__all__ = ["NAME_RULE", "is_valid_name"]

# A certificate's common name and a plain-text `fedpriv-silo` identity alike: short enough
# for a DNS label, no spaces, quotes or control characters (it appears in logs and paths).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_valid_name(name: str) -> bool:
    """Whether `name` may name a silo, an operator or the coordinator.

    >>> is_valid_name("hospital-a"), is_valid_name("a b"), is_valid_name("x" * 64)
    (True, False, False)
    """
    return bool(_NAME.match(name))
