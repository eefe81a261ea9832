"""Griffe extension: the docstrings' Sphinx roles (``:class:`~a.b.C```, ``:func:`f```) rendered as code, not as text.

The package's docstrings cross-reference with Sphinx roles, which mkdocstrings leaves verbatim. They become inline
code: the last component with ``~`` (as Sphinx shows it), else the whole dotted name.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const|paramref):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2).strip()
    name = target.rsplit(".", 1)[-1] if short else target
    return f"`{name}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
