"""The training package stays readable: no function in tinylm/train/ over 50 lines, and no import of the rooms
above it (the analysis, the command lines): what those add to a run is handed in (train(..., tracker=...))."""
import ast
import glob
import os

from conftest import ROOT

TRAIN = os.path.join(ROOT, "tinylm", "train")
MAX_LINES = 50
ABOVE = ("tinylm.analysis", "tinylm.cli")


def functions(tree):
    """(qualified name, first line, lines) of every function in a module, nested ones and methods included;
    a function's lines run from its first decorator to its last line."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append((prefix + child.name, first, child.end_lineno - first + 1))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)
    visit(tree, "")
    return out


def imported_modules(tree, package):
    """Every module an import statement anywhere in the module names (relative ones resolved from `package`)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def modules():
    paths = sorted(glob.glob(os.path.join(TRAIN, "*.py")))
    assert len(paths) >= 5 and any(p.endswith("loop.py") for p in paths)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, ROOT), ast.parse(f.read(), filename=path)


def test_no_function_in_the_training_package_is_over_50_lines():
    too_long = [f"{path}:{line} {name} is {n} lines" for path, tree in modules()
                for name, line, n in functions(tree) if n > MAX_LINES]
    assert not too_long, f"functions over {MAX_LINES} lines: " + "; ".join(too_long)


def test_the_training_package_imports_neither_the_analysis_nor_the_command_lines():
    found = [f"{path} imports {name}" for path, tree in modules()
             for name in imported_modules(tree, "tinylm.train") if name.startswith(ABOVE)]
    assert not found, "; ".join(found)


def test_the_checks_name_what_they_find():
    """The walkers see nested functions and methods, decorators, and imports in function bodies, relative too."""
    body = "\n".join(f"        x{i} = {i}" for i in range(48))
    source = (f"import tinylm.cli.train\n"
              f"class C:\n"
              f"    @staticmethod\n"
              f"    def outer():\n"
              f"        from ..analysis import tracking\n"
              f"        def inner():\n"
              f"            return 1\n{body}\n")
    tree = ast.parse(source)
    assert [(n, lines) for n, _, lines in functions(tree)] == [("C.outer", 53), ("C.outer.inner", 2)]
    assert {"tinylm.cli.train", "tinylm.analysis.tracking"} <= set(imported_modules(tree, "tinylm.train"))
