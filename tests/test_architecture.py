"""The house plan (docs/architecture.md) kept by the code: the rooms' import rules, core's size, every module on the plan.

Each assertion names the rule a change breaks, the module that breaks it and the import that does.
"""
import ast
import os
import re

import pytest

from conftest import ROOT

# Rooms from the bottom up: a module may import from its own room and from rooms below it, never above.
# errors.py, atomic.py and files.py are the floor every room stands on; the `python -m tinylm.X` front doors are the roof.
ROOMS = ("base", "core", "fast", "text", "lowrank", "io", "train", "analysis", "cli", "exercises", "front door")
BASE = {"tinylm", "tinylm.errors", "tinylm.atomic", "tinylm.files"}
FRONT_DOORS = {"tinylm.export", "tinylm.compress", "tinylm.gradcheck"}
CORE_MAX_LINES = 1300
CORE_MAX_FUNCTION_LINES = 40


def modules(folder="tinylm"):
    """module name -> path, for every .py file under folder (exercise starters and solutions are the learner's)."""
    found = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        if "starters" in dirpath or "solutions" in dirpath or "__pycache__" in dirpath:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return found


def room(module):
    if module in BASE:
        return "base"
    if module in FRONT_DOORS:
        return "front door"
    return module.split(".")[1]


def imports(path):
    """[(lineno, imported tinylm module or name path, at module top level?)] for every tinylm import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module + "." + a.name for a in node.names]
            names = [t for t in targets if t.startswith("tinylm")]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tinylm")]
        else:
            continue
        for name in names:
            out.append((node.lineno, name, id(node) in top))
    return out


def resolve(name, known):
    """The module an import refers to: `tinylm.fast.model.forward` -> `tinylm.fast.model`."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_room_imports_only_itself_and_the_rooms_below(module):
    here = room(module)
    for lineno, name, _ in imports(MODULES[module]):
        target = resolve(name, MODULES)
        there = room(target)
        assert ROOMS.index(there) <= ROOMS.index(here), (
            f"rule 'a room imports only rooms below it' broken: {module} ({here}) imports {target} ({there}) "
            f"at line {lineno}; move the shared piece down, or pass it in")
        if here == "core":
            assert there == "core" or target == "tinylm.errors", (
                f"rule 'core imports only NumPy, the standard library, core and tinylm.errors' broken: "
                f"{module} imports {target} at line {lineno}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_tinylm_imports_sit_at_the_top_of_the_module(module):
    for lineno, name, at_top in imports(MODULES[module]):
        assert at_top, (f"rule 'no tinylm import inside a function body' broken: {module} imports {name} at line "
                        f"{lineno}; only optional dependencies (matplotlib, mpi4py, torch) are imported where used")


def test_no_import_cycles():
    graph = {m: sorted({resolve(n, MODULES) for _, n, _ in imports(p)} - {m}) for m, p in MODULES.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph.get(m, ()):
            if state.get(n) == "open":
                cycle = path[path.index(n):] + [n]
                raise AssertionError("rule 'no import cycles' broken: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checkpoint_does_not_import_the_optimizer_nor_training_the_analysis():
    for module, forbidden in (("tinylm.io.checkpoint", ("tinylm.core.optim", "tinylm.core.muon", "tinylm.fast.optim")),
                              *((m, ("tinylm.analysis",)) for m in MODULES if m.startswith("tinylm.train"))):
        for lineno, name, _ in imports(MODULES[module]):
            assert not resolve(name, MODULES).startswith(forbidden), f"{module} imports {name} at line {lineno}"


def test_the_benchmarks_are_outside_the_package_and_import_no_cycle():
    assert not [m for m in MODULES if "bench" in m], "benchmarks live in benchmarks/, not in the package"
    bench = modules("benchmarks")
    assert {"benchmarks.bench", "benchmarks.bench_train"} <= set(bench)
    for module, path in bench.items():
        for lineno, name, at_top in imports(path):
            assert not name.startswith("tinylm.") or resolve(name, MODULES) in MODULES, (module, name)


def functions(path):
    """[(name, first line, number of lines)] of every function (nested ones too) in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_core_reads_in_one_sitting():
    core = {m: p for m, p in MODULES.items() if room(m) == "core"}
    assert {"tinylm.core.layers", "tinylm.core.gpt2", "tinylm.core.optim", "tinylm.core.muon", "tinylm.core.polar",
            "tinylm.core.sampling"} <= set(core)
    total = sum(len(open(p, encoding="utf-8").read().splitlines()) for p in core.values())
    assert total <= CORE_MAX_LINES, f"tinylm/core is {total} lines; the reading path's budget is {CORE_MAX_LINES}"
    for module, path in core.items():
        for name, line, n in functions(path):
            assert n <= CORE_MAX_FUNCTION_LINES, (f"{module}.{name} (line {line}) is {n} lines; a function in core "
                                                  f"fits on a screen ({CORE_MAX_FUNCTION_LINES})")


def tree_paths(tree):
    """The paths a tree drawing lists: a line is `<indent>name  comment`, a folder's name ends in `/`, and the
    files and folders under it are indented two spaces more."""
    paths, stack = set(), []
    for line in tree.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        del stack[depth:]
        for name in line.strip().split("  ")[0].split():    # a line may list several short names
            if name.endswith("/"):
                stack.append(name)
                paths.add("".join(stack))
            elif name.endswith(".py") or "." in name:
                paths.add("".join(stack) + name)
    return paths


def test_every_module_is_on_the_house_plan():
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        plan = f.read()
    listed = tree_paths(plan.split("```")[1])           # the first code block: the tree
    files = {os.path.relpath(p, ROOT) for p in {**MODULES, **modules("benchmarks")}.values()}
    missing = sorted(f for f in files if not f.endswith("__init__.py") and f not in listed)
    assert not missing, f"modules missing from docs/architecture.md's tree: {missing}"
    stale = sorted(p for p in listed if not os.path.exists(os.path.join(ROOT, p)))
    assert not stale, f"docs/architecture.md's tree lists paths that do not exist: {stale}"
    for rule in ("a room imports only", "no tinylm import inside a function", "no import cycles"):
        assert rule in plan.lower(), f"docs/architecture.md does not state the rule {rule!r}"
