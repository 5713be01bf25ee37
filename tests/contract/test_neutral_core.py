"""The neutral core never imports a framework, nor names one: checked by running it with the
frameworks blocked, and statically over every file of the neutral layers (``prunekit/`` and
``conformance/``, i.e. the installed package minus ``prunekit.backends``)."""
import ast
import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/<file>
PACKAGE_DIR = os.path.join(ROOT, "prunekit")
NEUTRAL_DIRS = (PACKAGE_DIR, os.path.join(ROOT, "conformance"))
FRAMEWORKS = ("torch", "mindspore", "torchvision")
#: what counts as naming a framework in code (case-insensitive; torchvision, torchrun, MindSpore ...)
FRAMEWORK_NAME = re.compile(r"torch|mindspore", re.IGNORECASE)

BLOCKED_IMPORT_SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by test: {{name}}")
            return None

    for name in list(sys.modules):  # nothing framework-related may be cached already
        assert name.split(".")[0] not in BLOCKED, name
    sys.meta_path.insert(0, Blocker())

    # the blocker itself works
    for fw in BLOCKED:
        try:
            importlib.import_module(fw)
        except ImportError:
            pass
        else:
            raise SystemExit(f"blocker failed to block {{fw}}")

    import prunekit
    imported = ["prunekit"]
    failures = []
    for info in pkgutil.walk_packages(prunekit.__path__, "prunekit.", onerror=lambda n: failures.append(n)):
        if info.name.endswith(".__main__"):  # runs the CLI when imported; checked statically instead
            continue
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except Exception as e:
            failures.append(f"{{info.name}}: {{type(e).__name__}}: {{e}}")
    leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)

    # the registry reports a blocked framework as unavailable instead of crashing
    from prunekit.contract.backend import available_backends, backend_names, get_backend
    from prunekit.errors import BackendUnavailable
    if not backend_names():
        failures.append("no backend registered")
    for name in backend_names():
        try:
            get_backend(name)
            failures.append(f"get_backend({{name!r}}) succeeded with its framework blocked")
        except BackendUnavailable:
            pass
    if available_backends() != []:
        failures.append(f"available_backends() = {{available_backends()}} with frameworks blocked")

    print("IMPORTED", " ".join(imported))
    print("FAILURES", repr(failures))
    print("LEAKED", repr(leaked))
    raise SystemExit(1 if failures or leaked else 0)
""")


def _package_modules():
    """Module names of every .py file under prunekit/, found by walking the file system."""
    names = []
    for dirpath, dirnames, filenames in os.walk(PACKAGE_DIR):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and os.path.exists(os.path.join(dirpath, d, "__init__.py"))]
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__main__":
                    continue
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                names.append(".".join(rel))
    return sorted(names)


def test_whole_package_imports_with_frameworks_blocked():
    script = BLOCKED_IMPORT_SCRIPT.format(blocked=set(FRAMEWORKS))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    imported = set(next(l for l in proc.stdout.splitlines() if l.startswith("IMPORTED")).split()[1:])
    # every module on disk was reached by the walk (the walk did not silently stop early)
    expected = set(_package_modules())
    assert expected <= imported, f"not imported: {sorted(expected - imported)}"
    assert {"prunekit.contract.ops", "prunekit.decisions.selection", "prunekit.algorithms.magnitude"} <= imported


def _framework_imports(path):
    """(line, module) of every import statement in ``path`` that names a blocked framework."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [node.module or ""] if node.level == 0 else []
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__"
              and node.args and isinstance(node.args[0], ast.Constant)):
            mods = [str(node.args[0].value)]
        else:
            continue
        hits += [(node.lineno, m) for m in mods if m.split(".")[0] in FRAMEWORKS]
    return hits


def _python_files(*tops):
    """Every ``.py`` file below the given folders (``__pycache__`` left out)."""
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            yield from (os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))


def test_no_framework_import_statement_in_package():
    paths = list(_python_files(PACKAGE_DIR))
    offenders = [f"{os.path.relpath(path, ROOT)}:{line}: {mod}" for path in paths for line, mod in _framework_imports(path)]
    assert len(paths) >= 10  # the walk really saw the package
    assert offenders == []


def test_static_checker_catches_framework_imports(tmp_path):
    """The static check above would notice a violation (guards against a vacuous pass)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nimport torch.nn as nn\nfrom mindspore import ops\n"
                   "def f():\n    import torchvision\n    return __import__('torch')\n"
                   "from . import torchlike\nimport torchaudio_not\n")
    mods = sorted(m for _, m in _framework_imports(str(bad)))
    assert mods == ["mindspore", "torch", "torch.nn", "torchvision"]


# ---------------------------------------------------------------------------- framework names
def _docstrings(tree):
    """The string constants that are docstrings (of the module, classes and functions)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _framework_names(source: str, filename: str = "<source>"):
    """(line, text) of every import, identifier, attribute, argument or keyword name and every
    non-docstring string constant in ``source`` that names a framework. Comments and docstrings
    may mention one."""
    tree = ast.parse(source, filename=filename)
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            texts = [node.value]
        elif isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.alias):
            texts = [node.name, node.asname or ""]
        elif isinstance(node, ast.ImportFrom):
            texts = [node.module or ""]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts = [node.name]
        elif isinstance(node, ast.arg):
            texts = [node.arg]
        elif isinstance(node, ast.keyword):
            texts = [node.arg or ""]
        hits += [(getattr(node, "lineno", 0), t) for t in texts if FRAMEWORK_NAME.search(t)]
    return hits


def test_neutral_layers_name_no_framework():
    paths = list(_python_files(*NEUTRAL_DIRS))
    offenders = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            hits = _framework_names(fh.read(), path)
        offenders += [f"{os.path.relpath(path, ROOT)}:{line}: {text[:60]!r}" for line, text in hits]
    assert len(paths) >= 10  # the walk really saw the package
    assert offenders == [], "framework names in the neutral layers (move them into the backend):\n" + "\n".join(offenders)


def test_name_checker_catches_framework_names():
    """The check above would notice each kind of violation, and lets docstrings and comments be."""
    source = textwrap.dedent('''
        """Runs on PyTorch and MindSpore (a docstring may say so)."""
        import mindspore_stub as stub                # 3: import
        from torchlike import helper                 # 4: module of a from-import
        LAUNCHER = "torchrun --nproc_per_node=N"     # 5: string constant
        def to_torch(x, ms_tensor=None):             # 6: function name
            """Converts for torch."""
            return x.torch_value, f"{x} on MindSpore"  # 8: attribute, f-string part
        def f(torch_dtype):                          # 9: argument
            return dict(mindspore=1)                 # 10: keyword
        class TorchThing:                            # 11: class name
            pass
        torch_ok = 1                                 # 13: identifier
        # torch in a comment is fine
    ''')
    lines = sorted({line for line, _ in _framework_names(source)})
    assert lines == [3, 4, 5, 6, 8, 9, 10, 11, 13]


#: the neutral layers, bottom up; a module may import its own layer and those below it
LAYERS = ("contract", "decisions", "algorithms", "app")
#: imports allowed upward, with the reason (the ``conformance`` command is part of the CLI)
UPWARD_ALLOWED = {("app", "conformance")}


def _layer_violations(path: str, layer: str):
    """Imports of ``prunekit.<higher layer>`` in a file of ``layer`` (docs/ARCHITECTURE.md)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] != "prunekit" or len(parts) < 2 or parts[1] == "errors":
                continue
            target = parts[1]
            if (layer, target) in UPWARD_ALLOWED:
                continue
            if target not in rank or rank[target] > rank[layer]:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {module}")
    return found


def test_layers_import_only_downward():
    violations = [v for layer in LAYERS for path in _python_files(os.path.join(PACKAGE_DIR, layer))
                  for v in _layer_violations(path, layer)]
    assert not violations, "upward imports: " + "; ".join(violations)
    # the top-level package holds only the layers, the exceptions and the entry points
    top = sorted(f for f in os.listdir(PACKAGE_DIR) if f.endswith(".py"))
    assert top == ["__init__.py", "__main__.py", "errors.py"], top


def test_layer_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from prunekit.app.job import run\nfrom prunekit.contract.ops import Ops\n")
    assert len(_layer_violations(str(bad), "decisions")) == 1
    assert _layer_violations(str(bad), "app") == []
