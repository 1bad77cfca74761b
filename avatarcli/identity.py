"""Identity rules: which person a video belongs to, from its path ('parent', 'stem' or 'regex:PATTERN')."""

from __future__ import annotations

import re
from pathlib import Path

from avatarcli.errors import AvatarError


def identity_of(path: str, rule: str) -> str:
    """The identity of the video at ``path``: its folder's name ('parent'), its file stem ('stem'),
    or the first group (else the whole match) of a regular expression searched in the path
    ('regex:PATTERN'; 'unknown' where it does not match)."""
    p = Path(path)
    if rule == "parent":
        return p.parent.name or "unknown"
    if rule == "stem":
        return p.stem
    if rule.startswith("regex:"):
        match = re.search(rule[len("regex:"):], path)
        if not match:
            return "unknown"
        return match.group(1) if match.groups() else match.group(0)
    raise AvatarError(f"--identity-from must be parent, stem or regex:PATTERN, not {rule!r}")


def check_identity_rule(rule: str) -> None:
    """Raise an ``AvatarError`` unless ``rule`` is 'parent', 'stem' or 'regex:' with a valid pattern."""
    if rule in ("parent", "stem"):
        return
    if not rule.startswith("regex:"):
        raise AvatarError(f"--identity-from must be parent, stem or regex:PATTERN, not {rule!r}")
    try:
        re.compile(rule[len("regex:"):])
    except re.error as exc:
        raise AvatarError(f"--identity-from: bad regular expression: {exc}") from None
