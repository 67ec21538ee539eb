"""Serve the browser client (``wsmanager/static/wsmanager.js``) from an app.

    from wsmanager.client import mount_client
    mount_client(app)                      # GET /wsmanager/wsmanager.js

and in the page::

    <script type="module">
      import { WSManagerClient } from "/wsmanager/wsmanager.js";
    </script>
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Scope

__all__ = ["CLIENT_DIR", "CLIENT_JS", "client_files", "mount_client"]

CLIENT_DIR = Path(__file__).resolve().parent / "static"
"""The folder holding ``wsmanager.js`` and its type declarations ``wsmanager.d.ts``."""

CLIENT_JS = CLIENT_DIR / "wsmanager.js"


class _ClientFiles(StaticFiles):
    """StaticFiles that labels ``.js`` as JavaScript on every platform (module
    scripts are refused with a wrong MIME type) and ``.d.ts`` as text."""

    def file_response(
        self,
        full_path: PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        path = str(full_path)
        if path.endswith(".d.ts"):
            response.headers["content-type"] = "text/plain; charset=utf-8"
        elif path.endswith(".js"):
            response.headers["content-type"] = "text/javascript; charset=utf-8"
        return response


def client_files() -> ASGIApp:
    """An ASGI app serving the client's files (mount it wherever you like)."""
    return _ClientFiles(directory=CLIENT_DIR)


def mount_client(app: object, path: str = "/wsmanager", *, name: str = "wsmanager-client") -> None:
    """Mount the client on a Starlette / FastAPI ``app`` at ``path``.

    The module is then importable as ``{path}/wsmanager.js``. Raises TypeError
    when ``app`` has no ``mount`` method.
    """
    mount = getattr(app, "mount", None)
    if mount is None:
        raise TypeError(f"mount_client needs a Starlette or FastAPI app, got {type(app).__name__}")
    mount(path, client_files(), name=name)
