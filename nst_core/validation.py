"""One line from pydantic validation errors, for the CLI's stderr and a flow's Failed message."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pydantic import ValidationError

from .errors import hide_userinfo

__all__ = ["validation_problems", "format_validation_error"]


def validation_problems(err: ValidationError, root: str = "", skip_tags: Collection[str] = ()) -> list[str]:
    """``where: message`` per error. ``where`` is ``root`` and the field path (``params`` when both
    are empty); a leading path element in ``skip_tags`` (a discriminated union's tag) is left out,
    so a user reads ``source.styles``, not ``source.prefixes.styles``."""
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] in skip_tags:
            loc = loc[1:]
        where = ".".join([root, *loc] if root else loc) or "params"
        problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return problems


def format_validation_error(err: ValidationError | Iterable[str]) -> str:
    """``invalid parameters: where: message; …`` from one error, or from problems collected over
    several (``validation_problems``)."""
    problems = validation_problems(err) if isinstance(err, ValidationError) else list(err)
    return hide_userinfo("invalid parameters: " + "; ".join(problems))  # a URI's password quoted in a message
