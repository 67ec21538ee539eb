"""Build the C extension wsmanager._core.

Environment switches:
  WSM_DEV=1       -Werror and no optimisation shortcuts (what CI uses)
  WSM_SANITIZE=1  ASan + UBSan build (run with PYTHONMALLOC=malloc and
                  LD_PRELOAD of libasan, see the Makefile's test-asan target)
"""

from __future__ import annotations

import os

from setuptools import Extension, setup


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
                "csrc/fanout.c",
                "csrc/history.c",
            ],
            depends=[
                "csrc/registry.h",
                "csrc/table.h",
                "csrc/list.h",
                "csrc/pycompat.h",
                "csrc/activity.h",
                "csrc/ratelimit.h",
                "csrc/latency.h",
                "csrc/json_writer.h",
                "csrc/fanout.h",
                "csrc/history.h",
            ],
            include_dirs=["csrc"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ],
)
