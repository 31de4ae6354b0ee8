"""The project's own import graph, read from the source: the code a stage runs.

One answer serves two users: the train stage's checkpoint fingerprint (a checkpoint resumes only under the
code that wrote it) and the wiring test (dvc.yaml's code deps of each stage are exactly this). An import of
the project's own code that resolves to no file is an error, never skipped: skipping it would drop that code
from both."""
import ast
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
PACKAGES = ("cifar", "stages", "tools")  # the project's own top-level packages


# CPython 3.11's ast.parse can fail when two threads parse at once ("SystemError: AST constructor recursion
# depth mismatch"): tools.search's worker threads each check the training code before their trials
_PARSING = threading.Lock()


def parse(source, filename="<unknown>"):
    with _PARSING:
        return ast.parse(source, filename=filename)


class UnresolvedImport(Exception):
    """An import of the project's own code that names no file."""


def _module_files(parts):
    """The files that importing the dotted module `parts` (from ROOT) executes: every package's __init__.py on
    the way (where there is one) and the module's own file; None when the module is not there."""
    files, folder = [], ROOT
    for part in parts[:-1]:
        folder = folder / part
        if (folder / "__init__.py").is_file():
            files.append(folder / "__init__.py")
    target = folder / parts[-1]
    if (target.with_suffix(".py")).is_file():
        return files + [target.with_suffix(".py")]
    if (target / "__init__.py").is_file():
        return files + [target / "__init__.py"]
    if target.is_dir():  # a namespace package (stages/): nothing of its own runs
        return files
    return None


def _defines(init, name):
    """Whether the package's __init__.py defines `name` at its top level (so `from pkg import name` takes it)."""
    if not init.is_file():
        return False
    for node in parse(init.read_text()).body:
        targets = [t for n in [node] if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in
                   (n.targets if isinstance(n, ast.Assign) else [n.target])]
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        if name in names:
            return True
    return False


def imported_modules(path):
    """The project's files that the module at `path` imports, at any depth of its code (imports inside
    functions count too): `from .x import y`, `from . import x`, `from cifar.x import y`, `import cifar.x`.
    Raises UnresolvedImport for one that names no file."""
    path = Path(path).resolve()
    package = list(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                if len(base) < 1 or node.level > len(package):
                    raise UnresolvedImport(f"{path.relative_to(ROOT)}:{node.lineno}: relative import beyond the "
                                           "project's packages")
            elif (node.module or "").split(".")[0] in PACKAGES:
                base = []
            else:
                continue
            module = base + (node.module.split(".") if node.module else [])
            files = _module_files(module)
            if files is None:
                raise UnresolvedImport(f"{path.relative_to(ROOT)}:{node.lineno}: `{ast.unparse(node)}` names no "
                                       f"file of the project ({'/'.join(module)}.py)")
            found.update(files)
            for alias in node.names:  # from pkg import name: a submodule, or a name the package defines
                sub = _module_files(module + [alias.name])
                if sub is not None:
                    found.update(sub)
                elif not (module and _defines(ROOT.joinpath(*module, "__init__.py"), alias.name)) and \
                        not (ROOT.joinpath(*module).with_suffix(".py")).is_file():
                    raise UnresolvedImport(f"{path.relative_to(ROOT)}:{node.lineno}: `{ast.unparse(node)}`: "
                                           f"{alias.name} is no module or name of {'.'.join(module)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in PACKAGES:
                    files = _module_files(parts)
                    if files is None:
                        raise UnresolvedImport(f"{path.relative_to(ROOT)}:{node.lineno}: `import {alias.name}` "
                                               "names no file of the project")
                    found.update(files)
    found.discard(path)
    return found


def code_of(script):
    """The files a script (e.g. stages/train.py, run as `python -m stages.train`) executes of the project:
    itself and every project module it imports, transitively; sorted."""
    seen, todo = set(), [(ROOT / script).resolve()]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(path))
    return sorted(seen)
