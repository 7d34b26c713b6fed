"""Module-name patterns, shared by AutoMixedPrecision groups, Quantizer's skip lists and convert_to_fp8.

A pattern is a dotted name whose components must appear, consecutively, among the dot-separated components of a
module's qualified name. So ``'layer.0'`` matches ``bert.encoder.layer.0`` and everything under it
(``bert.encoder.layer.0.attention.self.query``), but not ``layer.00`` or ``layer.01``. Each component may be a glob
(``fnmatch``: ``*``, ``?``, ``[01]``): ``'layer.[01]'`` matches layers 0 and 1, ``'*.query'`` every ``query``.
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def _split(name: str) -> list[str]:
    return name.split(".") if name else []


def matches(pattern: str, module_name: str) -> bool:
    """Whether ``pattern`` matches the module called ``module_name`` (see the module docstring).

    Example:
        >>> matches('layer.0', 'bert.encoder.layer.0.attention')
        True
        >>> matches('layer.0', 'bert.encoder.layer.01')
        False
    """
    parts = _split(pattern)
    names = _split(module_name)
    if not parts:
        return False
    for start in range(len(names) - len(parts) + 1):
        if all(fnmatchcase(names[start + i], p) for i, p in enumerate(parts)):
            return True
    return False
