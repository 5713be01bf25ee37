"""Shared by the benchmarks: the machine description and writing one section of RESULTS.md.

Each benchmark owns one section, headed ``### <title>``; writing it again replaces it, so the
file always holds each benchmark's latest figures.
"""
from __future__ import annotations

import os
import platform
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def machine() -> str:
    import numpy as np

    versions = [f"NumPy {np.__version__}"]
    for name in ("torch", "mindspore"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def write_section(title: str, lines) -> None:
    """Replace (or add) the section whose heading starts with ``### <title>``."""
    marker = f"### {title}"
    section = "\n".join([f"{marker} ({time.strftime('%Y-%m-%d')})", ""] + list(lines)) + "\n"
    old = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    if marker in old:
        start = old.index(marker)
        end = old.find("\n### ", start + 1)
        old = old[:start] + old[end + 1:] if end != -1 else old[:start]
    with open(RESULTS, "w") as f:
        f.write(old.rstrip() + "\n\n" + section)
