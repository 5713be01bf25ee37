"""What installs: every package folder of the repository is listed in pyproject.toml under its
``prunekit.`` name (a wheel would silently leave out one that is not), and nothing installs a
top-level package other than ``prunekit`` (``backends/`` and ``conformance/`` are mapped under it)."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pyproject_tables():
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    packages = re.search(r"^packages\s*=\s*(\[[^\]]*\])", text, re.M | re.S)
    package_dir = re.search(r"^\[tool\.setuptools\.package-dir\]\n((?:\"[^\"]+\"\s*=\s*\"[^\"]+\"\n)+)", text, re.M)
    assert packages and package_dir, "pyproject.toml: [tool.setuptools] packages / package-dir not found"
    mapping = dict(re.findall(r"\"([^\"]+)\"\s*=\s*\"([^\"]+)\"", package_dir.group(1)))
    return ast.literal_eval(packages.group(1)), mapping


def _installed_name(folder: str, mapping: dict) -> str:
    """The import name a repository folder installs as, under the package-dir mapping."""
    for name, source in mapping.items():
        if folder == source or folder.startswith(source + "/"):
            return name + folder[len(source):].replace("/", ".")
    return folder.replace("/", ".")


def test_every_package_folder_installs_under_prunekit():
    packages, mapping = _pyproject_tables()
    assert all(p == "prunekit" or p.startswith("prunekit.") for p in packages), packages
    assert set(mapping) == {"prunekit.backends", "prunekit.conformance"}, mapping
    found = set()
    for top in ("prunekit", *mapping.values()):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                found.add(_installed_name(os.path.relpath(dirpath, ROOT).replace(os.sep, "/"), mapping))
    assert found == set(packages), (f"folders not listed in pyproject.toml: {sorted(found - set(packages))}; "
                                    f"listed but missing: {sorted(set(packages) - found)}")


def test_console_script_points_into_the_package():
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    target = re.search(r"^prunekit\s*=\s*\"([\w.]+):(\w+)\"", text, re.M)
    assert target, "no prunekit console script"
    module, function = target.groups()
    import importlib
    assert callable(getattr(importlib.import_module(module), function))
