"""dvc.yaml lists, as each stage's deps, every project module the stage imports (directly or not),
so that a change to any of them reruns the stage, and, as its params, exactly the params it loads."""
import ast
import re

import pytest
import yaml

from tests.conftest import REPO


def module_file(name):
    """stages.lib.train -> REPO/stages/lib/train.py (or the package's __init__.py)."""
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def imported_modules(path):
    """Project modules (dotted names under `stages`) that the file at `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] == "stages" and module_file(n).is_file()}


def closure(entry):
    """Every project source file that module `entry` needs, itself included, as repo-relative paths."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    files = {module_file(n).relative_to(REPO).as_posix() for n in seen}
    return {f for f in files if not f.endswith("__init__.py")}


def loaded_params(path):
    """The params names (sections, or section.key) that the file at `path` passes to `params.load`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "params.load":
            names += [arg.value for arg in node.args[1:]]
    return names


def stages():
    """[(stage name, entry module, declared deps, declared params)] of dvc.yaml (foreach stages once)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        body = stage.get("do", stage)
        entry = re.search(r"-m (stages\.\w+)", body["cmd"]).group(1)
        out.append((name, entry, set(body.get("deps", [])), body.get("params", [])))
    return out


STAGES = stages()


@pytest.mark.parametrize("name, entry, deps", [s[:3] for s in STAGES], ids=[s[0] for s in STAGES])
def test_every_imported_project_module_is_a_dependency(name, entry, deps):
    needed = closure(entry)
    assert needed - deps == set(), f"dvc.yaml: stage {name} imports but does not list {sorted(needed - deps)}"
    listed_code = {d for d in deps if d.startswith("stages/")}
    assert listed_code - needed == set(), f"dvc.yaml: stage {name} lists modules it does not import"


def test_the_import_walk_sees_indirect_imports():
    assert "stages/lib/cli.py" in closure("stages.split")  # split -> splits -> cli (and others)
    # pretrain -> simclr -> losses: pretrain does not import losses itself
    assert "stages/lib/losses.py" in closure("stages.pretrain")
    assert "stages.lib.losses" not in imported_modules(module_file("stages.pretrain"))


@pytest.mark.parametrize("name, entry, declared", [(n, e, p) for n, e, _, p in STAGES], ids=[s[0] for s in STAGES])
def test_a_stage_declares_exactly_the_params_it_loads(name, entry, declared):
    loaded = loaded_params(module_file(entry))
    assert loaded, f"stage {entry} loads no params"
    assert sorted(loaded) == sorted(declared), f"dvc.yaml: stage {name} lists params {declared}, loads {loaded}"
