"""The package's layers: the core imports no I/O or plotting library, ``checks`` and ``ops``
import (almost) nothing of the package, and functions stay short."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nadmm_torch"
HEAVY = ("torchio", "SimpleITK", "pytorch_lightning", "matplotlib")
MAX_FUNCTION_LINES = 80
# The settings and the core (ops, checks, config, module), the one-call API and tuning.
CORE_FILES = ["checks.py", "config.py", "module.py", "api.py", "tuning.py",
              *(f"ops/{p.name}" for p in sorted((PACKAGE / "ops").glob("*.py")))]


def _package_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (as dotted names relative to the package),
    leaving out imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n) for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    here = path.relative_to(PACKAGE).parent.parts
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = list(here[: len(here) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [])
            names = [".".join(target)] if node.module else [".".join(base + [a.name])
                                                            for a in node.names]
            out.update(names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            out.update(m.split(".", 1)[1] for m in mods if m.startswith("nadmm_torch."))
    return out


def test_checks_imports_nothing_of_the_package():
    assert _package_imports(PACKAGE / "checks.py") == set()


def test_ops_import_only_ops_and_checks():
    for path in sorted((PACKAGE / "ops").glob("*.py")):
        outside = {m for m in _package_imports(path) if not m.startswith("ops")} - {"checks"}
        assert outside == set(), f"{path.name} imports {sorted(outside)}"


def test_the_core_imports_no_io_or_plotting_library():
    code = ("import sys, nadmm_torch.module, nadmm_torch.config, nadmm_torch.ops.solver; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_core_functions_are_short():
    long = [f for name in CORE_FILES for f in _long_functions(PACKAGE / name)]
    assert long == []


def test_all_functions_are_short():
    long = [f for path in sorted(PACKAGE.rglob("*.py")) for f in _long_functions(path)]
    assert long == []
