"""Module-name patterns for AutoMixedPrecision groups (the matching itself is deepseek_ext.utils.names).

A pattern is a dotted name whose components must appear, consecutively, among the dot-separated components of a
module's qualified name. So ``'layer.0'`` matches ``bert.encoder.layer.0`` and everything under it
(``bert.encoder.layer.0.attention.self.query``), but not ``layer.00`` or ``layer.01``. Each component may be a glob
(``fnmatch``: ``*``, ``?``, ``[01]``): ``'layer.[01]'`` matches layers 0 and 1, ``'*.query'`` every ``query``.
"""

from __future__ import annotations

from ..utils.names import matches

__all__ = ["matches", "normalise_groups"]


def normalise_groups(groups, what: str) -> list[list[str]]:
    """Accepts ``['a', ['b', 'c']]`` (a string is a one-pattern group) and returns a list of pattern lists."""
    if groups is None:
        return []
    if isinstance(groups, str):
        groups = [groups]
    out = []
    for g in groups:
        patterns = [g] if isinstance(g, str) else list(g) if isinstance(g, (list, tuple)) else [g]
        for p in patterns:
            if not isinstance(p, str) or not p or p.startswith(".") or p.endswith(".") or ".." in p:
                raise ValueError(f"AutoMixedPrecision: {what} holds an invalid module-name pattern {p!r}")
        out.append(patterns)
    return out
