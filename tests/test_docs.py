"""The documentation (README.md and docs/*.md) against the repository it describes: every relative link and
image resolves to a file or folder (and every #fragment into a page to one of its headings), every
`python -m X` names a module that exists, every params key it names in code (`section.key` in code spans and
code blocks, or set by `-S`) is a key of params.yaml, every `dvc exp run` that sets a `system` key forces
its rerun, and README.md stays at most 12 KB."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_LIMIT = 12 * 1024  # bytes: a newcomer's one screenful; the rest belongs in docs/
DOCS = [README, *sorted((REPO / "docs").rglob("*.md"))]  # docs/runs/ too
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
SECTIONS = ("data", "model", "train", "evaluate", "export", "system")

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MODULE = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
# section.key, not part of a longer dotted name or path (cifar.model.load_model, stages/train.py), nor a call
# (model.eval()); keys are lowercase snake_case, so class names (data.DataParams) are not keys either
KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([a-z_][a-z0-9_]*)(?![\w(])")
SETTING = re.compile(r"-S\s+['\"]?([\w.]+)=")
EXP_RUN = re.compile(r"\bdvc\s+exp\s+run\b[^\n#&;|]*")  # one command: up to a comment or the next command
FORCE = re.compile(r"(?<!\S)(-f|--force)(?!\S)")
FILE_EXTENSIONS = {"py", "pt", "onnx", "yaml", "yml", "json", "md", "png", "tsv", "lock", "txt", "gz", "html",
                   "csv", "log", "tgz", "sh"}


def name(path):
    return path.relative_to(REPO).as_posix()


def split_code(text):
    """(prose with code spans blanked, [code span and code block texts]) of a markdown text."""
    prose, code, block, fenced = [], [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if fenced:
                code.append("\n".join(block))
                block = []
            fenced = not fenced
        elif fenced:
            block.append(line)
        else:
            code.extend(span[1:-1] for span in CODE_SPAN.findall(line))
            prose.append(CODE_SPAN.sub("`code`", line))
    return "\n".join(prose), code


def links(text):
    """The link and image targets of a markdown text, outside code."""
    prose, _ = split_code(text)
    return LINK.findall(prose)


def is_external(target):
    return re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) is not None  # http:, https:, mailto:, ...


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """The anchors of a page's headings, outside code blocks (a repeated heading gets -1, -2, ... as on
    GitHub)."""
    seen, result, fenced = {}, set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


@pytest.mark.parametrize("page", DOCS, ids=name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page.read_text()):
        if is_external(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{name(page)}: links to nothing: {', '.join(broken)}"


@pytest.mark.parametrize("page", DOCS, ids=name)
def test_every_link_fragment_names_a_heading(page):
    broken = []
    for target in links(page.read_text()):
        if is_external(target) or "#" not in target:
            continue
        path, fragment = target.split("#", 1)
        linked = (page.parent / path).resolve() if path else page
        if linked.suffix == ".md" and linked.is_file() and fragment not in anchors(linked):
            broken.append(target)
    assert not broken, f"{name(page)}: no such heading: {', '.join(broken)}"


@pytest.mark.parametrize("page", DOCS, ids=name)
def test_every_python_m_names_a_module(page):
    if str(REPO) not in sys.path:  # pytest.ini's pythonpath puts it there; a bare run may not
        sys.path.insert(0, str(REPO))
    missing = []
    for module in MODULE.findall(page.read_text()):
        module = module.rstrip(".")  # `python -m stages.<name>`, or a sentence's full stop
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package that does not exist
            found = False
        if not found:
            missing.append(module)
    assert not missing, f"{name(page)}: python -m of no module: {', '.join(sorted(set(missing)))}"


def named_keys(text):
    """The section.key names a page's code spans, code blocks and -S settings mention."""
    prose, code = split_code(text)
    keys = {f"{section}.{key}" for snippet in code for section, key in KEY.findall(snippet)}
    keys |= {setting for setting in SETTING.findall(text) if setting.split(".")[0] in SECTIONS}
    return {key for key in keys if key.split(".")[-1] not in FILE_EXTENSIONS}


@pytest.mark.parametrize("page", DOCS, ids=name)
def test_every_params_key_named_exists(page):
    unknown = []
    for key in named_keys(page.read_text()):
        section, _, rest = key.partition(".")
        if not isinstance(PARAMS.get(section), dict) or rest not in PARAMS[section]:
            unknown.append(key)
    assert not unknown, f"{name(page)}: not a key of params.yaml: {', '.join(sorted(unknown))}"


def unforced_system_runs(text):
    """The `dvc exp run` commands in a page's code that set a `system` key without --force: no stage depends
    on `system`, so DVC reruns nothing, and the experiment carries the previous run's results (its time too)."""
    _, code = split_code(text)
    return [command.strip() for snippet in code for command in EXP_RUN.findall(snippet)
            if any(key.startswith("system.") for key in SETTING.findall(command)) and not FORCE.search(command)]


@pytest.mark.parametrize("page", DOCS, ids=name)
def test_every_exp_run_that_sets_a_system_key_forces_the_rerun(page):
    unforced = unforced_system_runs(page.read_text())
    assert not unforced, f"{name(page)}: reruns nothing without --force: {'; '.join(unforced)}"


def test_the_checks_find_what_they_look_for():
    """The extraction itself, so a check that finds nothing cannot pass by accident."""
    text = ("See [a](docs/a.md#x) and ![b](figures/b.png \"t\"), not `[c](d)`. `model.blocks` and "
            "`cifar.model.load_model`, `model.pt`, `model.eval()`, `data.DataParams`, prose train.seed\n"
            "```bash\ndvc exp run -S 'model.widths=[1]' -S train.epochs=2   # python -m tools.sweep\n```\n")
    assert links(text) == ["docs/a.md#x", "figures/b.png"]
    assert named_keys(text) == {"model.blocks", "model.widths", "train.epochs"}
    assert MODULE.findall(text) == ["tools.sweep"]
    assert unforced_system_runs("`dvc exp run -S system.compile=true` and `dvc exp run -f -S system.compile=true`\n"
                                "```\ndvc exp run -S train.seed=1 && dvc exp run -S system.device=cpu  # --force\n"
                                "dvc exp run --force --downstream train -S 'system.compile=true'\n```\n") == [
        "dvc exp run -S system.compile=true", "dvc exp run -S system.device=cpu"]
    assert slug("The comparison report: `python -m tools.compare`") == "the-comparison-report-python--m-toolscompare"
    assert slug("A quick run") == "a-quick-run"


def test_readme_is_at_most_12_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT, (f"README.md: {size} bytes, over {README_LIMIT} (12 KB): move detail to "
                                  f"docs/ and link it")
