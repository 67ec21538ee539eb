"""A griffe extension for the API reference (mkdocs.yml loads it).

* The C core's classes and functions are read from ``wsmanager/_core.pyi``
  (their signatures and types); their docstrings live in the compiled module,
  so they are copied from it, without the signature line CPython's C
  docstrings start with.
* Docstrings use reST roles (``:class:`Connection```); they are shown as code.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")


def _runtime_doc(path: str) -> str | None:
    """The ``__doc__`` of ``wsmanager._core.<name>[.<member>]`` at run time."""
    module, _, rest = path.partition("._core.")
    target: Any = importlib.import_module(f"{module}._core")
    for part in rest.split("."):
        target = getattr(target, part, None)
    doc = getattr(target, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    name = rest.rsplit(".", 1)[-1]
    lines = doc.strip().splitlines()
    if lines[0].startswith(f"{name}("):  # "can_accept_connection(lobby_code) -> (bool, reason)"
        lines = lines[1:]
    text = "\n".join(lines).strip()
    return text or None


class WsmanagerDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        if obj.path.startswith("wsmanager._core.") and obj.docstring is None:
            doc = _runtime_doc(obj.path)
            if doc is not None:
                obj.docstring = griffe.Docstring(doc, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)  # type: ignore[arg-type]
