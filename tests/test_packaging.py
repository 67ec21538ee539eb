"""What a user sees of the package itself: the install hints of the optional extras, the
metadata, and what the sdist and the wheel hold (pyproject.toml, MANIFEST.in, the Makefile's
`make wheel` and `make test-pythons`, which test the installed wheel)."""

from __future__ import annotations

import ast
import email
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WSMANAGER_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **env},
    )


def build_env() -> dict[str, str]:
    """The environment of a build subprocess: without the ASan run's preload and options (the
    compiler and pip are not what the sanitizers check) and without its WSM_ switches."""
    drop = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONMALLOC", "WSM_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


HIDE_REDIS = "import sys; sys.modules['redis'] = None  # as if redis-py were not installed\n"


def test_redis_backend_without_redis_py_says_which_extra_to_install() -> None:
    proc = run_python(HIDE_REDIS + "from wsmanager.backends.redis import RedisBackend\n")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: wsmanager.backends.redis needs redis-py: install the extra with  "
        "pip install 'wsmanager[redis]'"
    )
    assert "ModuleNotFoundError" in proc.stderr  # the original, chained as the cause


def test_redis_url_in_the_environment_without_redis_py_says_which_extra_to_install() -> None:
    proc = run_python(HIDE_REDIS + "import wsmanager\n", WSMANAGER_REDIS_URL="redis://127.0.0.1:1/0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("pip install 'wsmanager[redis]'")


def test_the_in_memory_manager_needs_no_redis_py() -> None:
    proc = run_python(
        HIDE_REDIS + "import wsmanager; print(wsmanager.manager.get_stats()['total_connections'])\n"
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0\n", "")


# ---------------------------------------------------------------- the sdist and the wheel


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist `make wheel` builds (python -m build --sdist), built from this tree."""
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=build_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("wsmanager-*.tar.gz")
    return path


def sdist_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        top = tar.getnames()[0].split("/")[0]
        return {
            m.name[len(top) + 1 :]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def module_file(module: str, files: dict[str, bytes]) -> str | None:
    base = module.replace(".", "/")
    return next((f for f in (base + ".py", base + "/__init__.py") if f in files), None)


LOCAL = ("tests", "examples", "benchmarks")


def local_modules(source: bytes) -> set[str]:
    """The project modules a test file imports or starts ("tests.serve_app:app" strings)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"((?:tests|examples|benchmarks)(?:\.\w+)+):\w+", node.value)
            if m:
                found.add(m.group(1))
    return {m for m in found if m.split(".")[0] in LOCAL}


@pytest.mark.slow
def test_the_sdist_ships_the_tests_with_every_helper_they_import_or_start(sdist: Path) -> None:
    files = sdist_files(sdist)
    tests = [f for f in files if f.startswith("tests/test_") and f.endswith(".py")]
    assert len(tests) >= 30
    assert "tests/js/wsmanager.test.mjs" in files and "Makefile" in files
    missing = set()
    for name in tests:
        for module in local_modules(files[name]):
            # "from tests import servers" names a module; "from tests.servers import X" a name in it
            if module_file(module, files) is None and module_file(module.rsplit(".", 1)[0], files) is None:
                missing.add((name, module))
    assert not missing
    assert "examples/lobby_chat/app.py" in files  # tests/test_demo_app.py imports it


@pytest.mark.slow
def test_the_sdist_holds_every_c_source_and_the_license_but_no_build_output(sdist: Path) -> None:
    files = sdist_files(sdist)
    for src in sorted((ROOT / "csrc").iterdir()):
        assert f"csrc/{src.name}" in files
    assert files["LICENSE"].startswith(b"MIT License")
    assert not [f for f in files if f.endswith((".so", ".pyc")) or "__pycache__" in f]


@pytest.mark.slow
def test_the_wheel_built_from_the_sdist_holds_the_client_the_demo_and_the_license(
    sdist: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(sdist),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=build_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # setuptools' ~40-line "Package 'wsmanager.static' is absent from the `packages`
    # configuration" warning, once printed by every build
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr
    (whl,) = tmp_path.glob("wsmanager-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read("wsmanager-0.1.0.dist-info/METADATA"))
    for name in (
        "wsmanager/py.typed",
        "wsmanager/_core.pyi",
        "wsmanager/static/wsmanager.js",
        "wsmanager/static/wsmanager.d.ts",
        "wsmanager/backends/redis.py",
        "wsmanager/demo/app.py",
        "wsmanager/demo/static/index.html",
        "wsmanager-0.1.0.dist-info/licenses/LICENSE",
    ):
        assert name in names
    assert [n for n in names if n.startswith("wsmanager/_core.") and n.endswith(".so")]
    assert not [n for n in names if n.split("/")[0] in LOCAL]  # no top-level tests/examples
    assert meta["License-Expression"] == "MIT"
    assert "websocket" in meta["Keywords"].split(",")
    classifiers = meta.get_all("Classifier") or []
    for v in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {v}" in classifiers
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"demo", "redis", "metrics"} <= extras
    demo_needs = {
        re.split(r"[\[<>=;]", r)[0] for r in meta.get_all("Requires-Dist") or [] if 'extra == "demo"' in r
    }
    # what wsmanager.demo.app imports beyond wsmanager itself (wsmanager.metrics: prometheus-client),
    # and none of the development tools `make demo` once installed with it
    assert {"fastapi", "uvicorn", "prometheus-client"} <= demo_needs
    assert not demo_needs & {"mypy", "ruff", "playwright", "python-socketio", "pytest", "wsmanager"}
