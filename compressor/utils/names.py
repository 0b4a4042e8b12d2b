"""Dotted names in a torch module tree ("encoder.layer.0.attention.self.query.weight"): the one place that
turns a name into the module holding it, looks a submodule up, or puts a new one in its place.

Names are those of ``named_modules()`` / ``named_parameters()`` / ``named_buffers()``; a list index is just a
part ("layer.0"). The empty module name means the root.
"""

from __future__ import annotations

from torch import nn


def split_name(name: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``; a name without a dot belongs to the root: ``("", name)``."""
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def join_name(module_name: str, attr: str) -> str:
    """The inverse of :func:`split_name`: ``("a.b", "weight")`` -> ``"a.b.weight"``, ``("", "weight")`` -> ``"weight"``."""
    return f"{module_name}.{attr}" if module_name else attr


def module_name_of(name: str) -> str:
    """The name of the module that holds the tensor `name` ("" for the root)."""
    return split_name(name)[0]


def owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the parameter/buffer/submodule `name`, and the attribute name inside it.

    Raises AttributeError (torch's ``get_submodule`` message) when a module on the path does not exist."""
    module_name, attr = split_name(name)
    return (root.get_submodule(module_name) if module_name else root), attr


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at `path` ("" is `root`), or None when there is no module there."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule `name` (the parent must exist: AttributeError otherwise)."""
    parent, attr = owner(root, name)
    setattr(parent, attr, new)
