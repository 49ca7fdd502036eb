"""The compared methods, one module each; a new module here with a :class:`Method` subclass is a new method.

Example::

    >>> sorted(available_methods())  # doctest: +NORMALIZE_WHITESPACE
    ['actuallysparse', 'actuallysparse-coo', 'actuallysparse-orphaned', 'dense', 'nni', 'nni-structured',
     'random', 'rigl', 'set', 'torch-prune']
    >>> make_method("dense", scope="classifier").name
    'dense'
"""

from __future__ import annotations

import importlib
import pkgutil

from comparison.methods.base import Method, target_layer_names

__all__ = ["Method", "available_methods", "make_method", "target_layer_names"]


def available_methods() -> dict[str, type[Method]]:
    """Every method defined in this package, by its ``name``.

    Importing a method module is cheap: none imports a heavy dependency (NNI) at module level.
    """
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[Method]] = {}
    pending = list(Method.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        # Only a class that names itself is a method; a helper subclass inherits no registry slot.
        if isinstance(vars(cls).get("name"), str):
            found[cls.name] = cls
    return found


def make_method(name: str, scope: str = "classifier", seed: int = 0) -> Method:
    """A new instance of the method called ``name`` (one per cell: methods keep per-model state).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(sorted(methods))}")
    return methods[name](scope, seed)
