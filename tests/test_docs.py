"""The documentation site: it builds offline with --strict, documents every
public name, its tables match the code, and its examples run."""

from __future__ import annotations

import ast
import asyncio
import html
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import wsmanager
import wsmanager.backends
from tests.servers import uvicorn_server
from wsmanager import CLOSE_CODES, ConnectionManager
from wsmanager.backends.redis import RedisBackend

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


# ------------------------------------------------------------------ the build


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as ``make docs`` builds it (into a temporary folder)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_the_site_builds_strict_with_every_page(site: Path) -> None:
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert {"index", "getting-started", "migration", "configuration", "close-codes", "testing"} <= pages
    assert {"troubleshooting", "changelog", "api", "redis-backplane", "history", "rooms"} <= pages
    for page in pages:
        assert (site / f"{page}.html").is_file(), page


def test_the_pages_load_nothing_from_the_network(site: Path) -> None:
    # fonts, scripts, styles and images all come from the site itself
    external = re.compile(r"""<(?:link|script|img)\b[^>]*\b(?:href|src)=["']https?://""", re.I)
    for page in site.glob("*.html"):
        text = page.read_text()
        assert not external.search(text), page.name
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page.name


# ---------------------------------------------------------- the API reference


def anchors(site: Path) -> set[str]:
    return set(re.findall(r'id="(wsmanager[^"]*)"', (site / "api.html").read_text()))


def public_names_of(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and inspect.isclass(v) and v.__module__ == module.__name__
        ]
    return list(names)


def documented(ids: set[str], module: Any, name: str) -> bool:
    """Documented where it is defined, or under the name it is imported by."""
    obj = getattr(module, name)
    places = {f"{module.__name__}.{name}"}
    home = getattr(obj, "__module__", None)
    if isinstance(home, str) and (inspect.isclass(obj) or inspect.isfunction(obj)):
        places.add(f"{home}.{name}")
    return bool(places & ids)


def test_every_name_of_wsmanager_all_is_in_the_api_reference(site: Path) -> None:
    ids = anchors(site)
    missing = [n for n in wsmanager.__all__ if not documented(ids, wsmanager, n)]
    assert missing == []


def test_every_public_method_and_property_of_the_manager_is_in_the_api_reference(site: Path) -> None:
    ids = anchors(site)
    public = [n for n in dir(ConnectionManager) if not n.startswith("_")]
    assert {"connect", "broadcast_to_lobby", "get_stats", "serve", "max_connections"} <= set(public)
    missing = [n for n in public if f"wsmanager.ConnectionManager.{n}" not in ids]
    assert missing == []


def test_every_public_class_of_the_backends_is_in_the_api_reference(site: Path) -> None:
    ids = anchors(site)
    modules = [wsmanager.backends] + [
        importlib.import_module(f"wsmanager.backends.{m.name}")
        for m in pkgutil.iter_modules(wsmanager.backends.__path__)
        if not m.name.startswith("_")
    ]
    checked = []
    for module in modules:
        for name in public_names_of(module):
            obj = getattr(module, name)
            if inspect.isclass(obj):
                checked.append(name)
                assert documented(ids, module, name), f"{module.__name__}.{name}"
    assert {"Backend", "InMemoryBackend", "RedisBackend", "ClusterView"} <= set(checked)


def test_every_public_name_of_the_other_modules_is_in_the_api_reference(site: Path) -> None:
    ids = anchors(site)
    # every submodule not named here is public: a new one must be added to docs/api.md
    internal = {
        "manager",  # ConnectionManager: checked above
        "delivery",  # the send path: its Delivery class is documented, the rest is internal
        "servers",  # reads of uvicorn's / Starlette's private state
        "receiving",  # the pong reader behind serve()
        "backends",  # checked above
    }
    modnames = sorted(m.name for m in pkgutil.iter_modules(wsmanager.__path__) if not m.name.startswith("_"))
    assert {"stats", "codes", "endpoint", "events"} <= set(modnames)
    for modname in (m for m in modnames if m not in internal):
        module = importlib.import_module(f"wsmanager.{modname}")
        missing = [n for n in public_names_of(module) if not documented(ids, module, n)]
        assert missing == [], modname


def test_the_c_core_methods_keep_their_signatures_and_docstrings(site: Path) -> None:
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "api.html").read_text()))
    assert "can_accept_connection(lobby_code: str) -> tuple[bool, str]" in text
    assert "Whether a new connection to lobby_code would be admitted now" in text
    assert ":class:" not in text and ":meth:" not in text  # reST roles are shown as code


# ------------------------------------------------------- configuration tables


def table(page: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` in ``docs/<page>``."""
    text = "\n" + (DOCS / page).read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set(cells[0]) <= {"-", ":"} and cells[0] not in ("setting", "code", "error"):
                rows.append(cells)
        elif rows:
            break
    return rows


def code(cell: str) -> str:
    found = re.match(r"`([^`]*)`", cell)
    assert found, cell
    return found.group(1)


def make_manager(**kwargs: Any) -> object:
    return ConnectionManager(**kwargs)


def make_redis_backend(**kwargs: Any) -> object:
    return RedisBackend(**kwargs)


SETTINGS: list[tuple[str, Callable[..., Any], Callable[..., object]]] = [
    ("## `ConnectionManager`", ConnectionManager.__init__, make_manager),
    ("## `RedisBackend`", RedisBackend.__init__, make_redis_backend),
]


@pytest.mark.parametrize(("heading", "init", "build"), SETTINGS, ids=["manager", "redis"])
def test_every_constructor_setting_is_listed_with_its_default(
    heading: str, init: Callable[..., Any], build: Callable[..., object]
) -> None:
    params = {n: p for n, p in inspect.signature(init).parameters.items() if n != "self"}
    rows = table("configuration.md", heading)
    listed = [code(r[0]) for r in rows]
    assert sorted(listed) == sorted(params), "every parameter listed once"
    for row in rows:
        name, default = code(row[0]), ast.literal_eval(code(row[1]))
        assert params[name].default == default, name
        assert type(params[name].default) in (type(default), *type(default).__subclasses__()), name


BOUND = re.compile(r"^(None or )?(int|seconds|number) (>=|>) ([0-9.]+)$")


@pytest.mark.parametrize(("heading", "init", "build"), SETTINGS, ids=["manager", "redis"])
def test_the_accepted_values_listed_are_the_checks(
    heading: str, init: Callable[..., Any], build: Callable[..., object]
) -> None:
    checked = 0
    for row in table("configuration.md", heading):
        name, accepts = code(row[0]), row[2]
        found = BOUND.match(accepts)
        if not found:
            continue
        optional, kind, op, bound = found.groups()
        low = float(bound)
        checked += 1
        if optional:
            build(**{name: None})
        else:
            with pytest.raises(TypeError, match=f"^{name} "):
                build(**{name: None})
        lowest: float = int(low) if kind == "int" else low
        if op == ">=":
            build(**{name: lowest})  # the bound itself is accepted
            below: float = int(low) - 1 if kind == "int" else (low / 2 if low > 0 else -0.5)
        else:
            build(**{name: low + (1 if kind == "int" else 0.5)})
            below = low
        with pytest.raises(ValueError, match=f"^{name} "):
            build(**{name: below})
        with pytest.raises(TypeError, match=f"^{name} "):
            build(**{name: True})
        if kind == "int":
            with pytest.raises(TypeError, match=f"^{name} "):
                build(**{name: lowest + 0.5})
        else:
            with pytest.raises(ValueError, match=f"^{name} "):
                build(**{name: float("nan")})
    assert checked >= 5


def test_every_close_code_is_listed_with_its_reason() -> None:
    rows = table("close-codes.md", "# Close codes")
    listed = {code(r[1]): int(r[0]) for r in rows}
    assert listed == {reason: int(c) for reason, c in CLOSE_CODES.items()}


# ------------------------------------------------------------ the examples


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S)


EXAMPLE_PAGES = [
    "getting-started.md",
    "migration.md",
    "testing.md",
    "configuration.md",
    "history.md",
    "rooms.md",
]


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_the_python_examples_of_a_page_run(page: str) -> None:
    """Every ```python block of the page, in order, in one namespace (their
    asserts are the checks)."""
    blocks = python_blocks(page)
    assert blocks
    namespace: dict[str, Any] = {"__name__": f"docs_{page[:-3].replace('-', '_')}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} (block {i + 1})", "exec"), namespace)


def test_a_refusal_before_accept_is_http_403_from_a_real_server_and_serve_gives_4001() -> None:
    """The table of docs/testing.md, against a real uvicorn."""

    async def outcome(url: str) -> tuple[str, object]:
        try:
            async with connect(url) as ws:
                await ws.recv()
        except InvalidStatus as exc:
            return ("http", exc.response.status_code)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return ("close", (exc.rcvd.code, exc.rcvd.reason))
        raise AssertionError("not refused")

    with uvicorn_server("tests.refusal_app:app") as (port, _proc):
        seed = asyncio.run(outcome(f"ws://127.0.0.1:{port}/seed-style"))
        served = asyncio.run(outcome(f"ws://127.0.0.1:{port}/served"))
    assert seed == ("http", 403)
    assert served == ("close", (4001, "unauthorized"))
    text = (DOCS / "testing.md").read_text()
    assert "`InvalidStatus`: HTTP 403" in text and "`ConnectionClosed`: 4001 `unauthorized`" in text


def test_the_readme_points_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make docs" in readme and "site/index.html" in readme


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_a_page_whose_examples_use_testclient_says_to_install_httpx2(page: str) -> None:
    """Starlette's TestClient needs httpx2, which neither wsmanager nor its
    `demo` extra installs: a new user running the page's example in a fresh
    venv otherwise stops at a RuntimeError the page never mentions."""
    if any("TestClient" in block for block in python_blocks(page)):
        assert "pip install httpx2" in (DOCS / page).read_text(), page


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_the_python_examples_of_a_page_define_every_name_they_use(page: str) -> None:
    """A block a user copies must run as written: pyflakes' undefined-name
    check (ruff F821) over the page's blocks, read in order as one module,
    for the pages whose examples need a server the suite does not run (Redis)
    too. Top-level await counts as a syntax error: wrap it in an async def."""
    source = "\n".join(python_blocks(page))
    if not source:
        return
    compile(source, f"docs/{page}", "exec")  # a SyntaxError names the line
    ruff = [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821"]
    proc = subprocess.run(
        [*ruff, "--output-format", "concise", "--stdin-filename", f"docs/{page}.py", "-"],
        input=source,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
