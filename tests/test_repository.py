"""The repository's own promises: docs links resolve, nothing cites a path outside the repository,
and the module and the rungs stay within their size budgets (issue "one algorithm, thin rungs")."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# file → most lines; each function in these files has at most FUNCTION_LINES lines
BUDGETS = {"nabla_gfn.py": 650, "toy_2d.py": 450, "toy_digits.py": 500, "sd_finetune.py": 750, "README.md": 250}
FUNCTION_LINES = 60


def _anchors(path: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces → dashes."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"


def test_no_file_cites_a_path_outside_the_repository():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".ipynb", ".txt", ".sh"}
               and not any(part.startswith(".") or part in {"runs", "__pycache__"} for part in p.relative_to(ROOT).parts)]
    tracked.append(ROOT / ".ci" / "run")
    offenders = [str(p.relative_to(ROOT)) for p in tracked
                 if p != Path(__file__) and re.search(r"\.\./shared|PAPER_NOTES", p.read_text(errors="ignore"))]
    assert not offenders, offenders


@pytest.mark.parametrize("name,most", sorted(BUDGETS.items()))
def test_size_budget(name, most):
    lines = len((ROOT / name).read_text().splitlines())
    assert lines <= most, f"{name}: {lines} lines, budget {most}"


@pytest.mark.parametrize("name", [n for n in BUDGETS if n.endswith(".py")])
def test_function_length(name):
    tree = ast.parse((ROOT / name).read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > FUNCTION_LINES]
    assert not long, f"{name}: functions over {FUNCTION_LINES} lines: {long}"
