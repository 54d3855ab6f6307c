"""The layers of docs/design.md, checked: every import in minift/ points down, and the low layers
import without the heavy dependencies of the high ones."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minift"
DESIGN = ROOT / "docs" / "design.md"


def layer_table() -> dict[str, int]:
    """{package: rank} from the table between the ``layers`` markers of docs/design.md."""
    text = DESIGN.read_text()
    table = text[text.index("<!-- layers:"):text.index("<!-- /layers -->")]
    ranks = {}
    for rank, packages in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", table, re.MULTILINE):
        for name in re.findall(r"`(\w+)`", packages):
            ranks[name] = int(rank)
    return ranks


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: minift.cuda.kernels -> cuda, minift.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def minift_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every minift import in a file under ``root``, function-level ones included."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("minift")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "minift":  # from minift import cuda -> minift.cuda
                found += [(node.lineno, f"minift.{alias.name}") for alias in node.names]
            elif name.startswith("minift."):
                found.append((node.lineno, name))
    return found


def test_every_package_has_a_rank():
    ranks = layer_table()
    units = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    units |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    missing = sorted(units - set(ranks))
    assert not missing, f"add these to the layer table of docs/design.md: {missing}"
    assert not sorted(set(ranks) - units), "the layer table names packages that do not exist"


def test_imports_only_point_down():
    ranks = layer_table()
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue  # the lazy front door names its exports as strings (checked below)
        own = unit_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, target in minift_imports(path):
            other = unit_of(target)
            if other == own:
                continue
            if other not in ranks:  # `import minift` or `from minift import Tensor`: the lazy front door
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {target} through minift/__init__.py, "
                                  "which can load any layer; import it from the module that owns it")
            elif ranks[other] >= ranks[own]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                                  f"({other}, rank {ranks[other]}) from {own} (rank {ranks[own]})")
    assert not violations, "imports that do not point down:\n" + "\n".join(violations)


def test_the_walker_sees_a_violation(tmp_path):
    """The check above can fail: upward imports written every way Python allows are found, and so
    is an import of the front door (``import minift``)."""
    (tmp_path / "minift" / "nn").mkdir(parents=True)
    bad = tmp_path / "minift" / "nn" / "bad.py"
    bad.write_text("import minift\nimport minift.serve\nfrom minift.training import Trainer\n"
                   "def f():\n    from minift import studies\n    from ..peft import lora\n")
    found = [unit_of(target) for _, target in minift_imports(bad, tmp_path)]
    assert sorted(found) == ["__init__", "peft", "serve", "studies", "training"]


def loaded_after(statement: str) -> set[str]:
    """Top-level names of the non-standard-library modules loaded by ``statement`` in a fresh Python."""
    code = ("import sys\nbefore = set(sys.modules)\n"
            f"{statement}\n"
            "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
            "print(' '.join(sorted(new - set(sys.stdlib_module_names))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize("package", ["autograd", "nn", "optim", "quant", "models"])
def test_the_engine_and_the_layers_need_only_numpy(package):
    assert loaded_after(f"import minift.{package}") <= {"minift", "numpy"}


def test_import_minift_loads_nothing_until_a_name_is_used():
    code = ("import sys, minift\n"
            "assert [m for m in sys.modules if m.startswith('minift.')] == [], sorted(sys.modules)\n"
            "minift.Tensor([1.0])\n"
            "assert 'minift.autograd' in sys.modules and 'minift.training' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_name_of_the_front_door_resolves():
    import minift  # noqa: PLC0415

    assert set(minift.__all__) == {*minift._EXPORTS, "__version__"}
    for name in minift.__all__:
        assert getattr(minift, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        minift.Trainer  # noqa: B018 - the lookup is the test


def test_inside_the_package_numpy_is_spelled_out():
    """docs/design.md: ``numpy.`` means the host, ``xp.`` the active backend; ``np`` would blur it."""
    short = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "import numpy as np" in p.read_text()]
    assert not short, f"import numpy (not as np) in: {short}"
