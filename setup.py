"""Build the C extension wsmanager._core.

Environment switches:
  WSM_DEV=1       -Werror and no optimisation shortcuts (what CI uses)
  WSM_SANITIZE=1  ASan + UBSan build (run with PYTHONMALLOC=malloc and
                  LD_PRELOAD of libasan, see the Makefile's test-asan target)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

UTHASH_HELP = (
    "wsmanager needs uthash.h to build its C core.\n"
    "Install Debian's package:  apt-get install uthash-dev\n"
    "(or set WSM_UTHASH_INCLUDE to the folder that holds uthash.h)"
)


def find_uthash() -> list[str]:
    candidates = [os.environ.get("WSM_UTHASH_INCLUDE", ""), "/usr/include", "/usr/local/include"]
    for folder in candidates:
        if folder and (Path(folder) / "uthash.h").is_file():
            return [] if folder in ("/usr/include", "/usr/local/include") else [folder]
    # Commands that do not compile (sdist, egg_info, clean) need no header.
    compiling = any(
        cmd in sys.argv
        for cmd in ("build_ext", "build", "bdist_wheel", "install", "develop", "editable_wheel")
    )
    if compiling:
        sys.exit("error: uthash.h not found.\n" + UTHASH_HELP)
    return []


def compile_args() -> tuple[list[str], list[str]]:
    cflags = ["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
    ldflags: list[str] = []
    if os.environ.get("WSM_DEV") == "1":
        cflags.append("-Werror")
    if os.environ.get("WSM_SANITIZE") == "1":
        san = [
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=undefined",
            "-O1",
            "-g",
        ]
        cflags += san
        ldflags += ["-fsanitize=address,undefined"]
    else:
        cflags.append("-O2")
    return cflags, ldflags


cflags, ldflags = compile_args()

setup(
    ext_modules=[
        Extension(
            "wsmanager._core",
            sources=[
                "csrc/module.c",
                "csrc/registry.c",
                "csrc/table.c",
                "csrc/activity.c",
                "csrc/ratelimit.c",
                "csrc/latency.c",
                "csrc/json_writer.c",
            ],
            depends=[
                "csrc/registry.h",
                "csrc/table.h",
                "csrc/list.h",
                "csrc/activity.h",
                "csrc/ratelimit.h",
                "csrc/latency.h",
                "csrc/json_writer.h",
            ],
            include_dirs=["csrc", *find_uthash()],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ],
)
