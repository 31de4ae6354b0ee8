"""The package's own import graph, read from the source: the code a stage runs.

One answer serves two users: the train stage's checkpoint fingerprint (a checkpoint resumes only under the
code that wrote it) and the wiring test (dvc.yaml's code deps of each stage are exactly this)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def imported_modules(path):
    """The files of this package that the module at `path` imports (relative or absolute imports, at any
    depth of the code, so imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import x
            names = [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stages."):
            names = [node.module.removeprefix("stages.")]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("stages.") for a in node.names if a.name.startswith("stages.")]
        else:
            continue
        for name in names:
            module = PACKAGE / f"{name.split('.')[0]}.py"
            if module.is_file():  # `from . import x` may also name something of __init__.py: there is nothing
                found.add(module)
    return found


def code_of(module):
    """The files a stage run as `python -m stages.<module>` executes: its script, the package's __init__.py
    and every module they import, transitively; sorted."""
    seen, todo = set(), [PACKAGE / f"{module}.py", PACKAGE / "__init__.py"]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(path))
    return sorted(seen)
