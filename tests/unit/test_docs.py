"""The docs point at things that exist.

- Every relative markdown link in README.md and docs/*.md names a file or folder inside the repository, and a
  `#anchor` on a markdown file names one of its headings (GitHub's slugs).
- Every repository path written in their code (inline spans and fenced blocks), e.g. `results/bench/bench_cpu.json`
  or `prompts/bench.jsonl`, exists, and a function named as in `FILE.py::test_name` is defined in that file. A path
  counts when it starts with one of the repository's top-level folders (TOP_LEVEL); URLs, absolute paths, `~/...`,
  `runs/...`, globs and placeholders (`OUT.json`, `NAME`) are left alone, and `{a,b}` alternatives are expanded.
- Every such path ending in .py, .md, .json or .jsonl in a comment or docstring of the project's Python files exists
  (with its `#anchor` or `::function`), and a docs section named in one ("docs/design.md, Method") is a heading of
  that page.
- No file names the background notes the docs replaced.
"""

from __future__ import annotations

import ast
import io
import itertools
import os
import re
import subprocess
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Top-level folders a written path may start with. `bench` is the pre-restructuring name of `experiments/` (and of the
# prompts' folder): a path under it can only be stale, so it is checked (and fails) like any other.
TOP_LEVEL = (
    "apps", "bench", "docker", "docs", "experiments", "k8s", "loadtest", "orchestrator", "primary_svc", "prompts",
    "protos", "results", "secondary_svc", "tandem", "tandemrpc", "tests",
)  # fmt: skip
TOP_FILES = ("README.md", "CHANGELOG.md", "Makefile", "pyproject.toml")
KNOWN_CAPS = {"README", "CHANGELOG", "LICENSE", "Makefile", "Dockerfile"}  # capitalised names that are not placeholders
CODE_EXTENSIONS = (".py", ".md", ".jsonl", ".json")
# The background notes the docs replaced; written split so that this file does not name them itself.
RETIRED_NOTES = tuple(stem + ".md" for stem in ("DESIGN", "ANCHORS", "PAPER"))
# The restructuring's hand-off list of the comments that cited those notes (a working file, not part of the project).
NOT_SCANNED = {".citations.txt"}
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "dist"}

_PREFIX = "|".join(re.escape(p) for p in TOP_LEVEL)
# A path: a top-level folder, then path characters or {a,b} groups; not preceded by a path character, so the tails of
# `/tmp/x`, `~/.cache/tandem` or `runs/ft/export/tandem/` never match.
PATH_RE = re.compile(
    rf"(?<![\w./~-])(?P<path>(?:(?:{_PREFIX})/(?:[\w.*?<>\-/]|\{{[\w.,\-]*\}})*|"
    rf"{'|'.join(re.escape(f) for f in TOP_FILES)}))(?:#(?P<anchor>[\w\-]+)|::(?P<function>\w+))?"
)
LINK_RE = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# A comment naming a section of a docs page by its heading: "docs/design.md, Measured facts about the CPU".
SECTION_RE = re.compile(r"(?<![\w./-])(?P<page>docs/[\w-]+\.md),\s+(?P<section>[A-Z][A-Za-z0-9 \n-]*?)\s*(?=[);:,.]|$)")


# --- extraction ------------------------------------------------------------------------------------------------------


def expand_braces(path: str) -> list[str]:
    """`a.{json,md}` -> [`a.json`, `a.md`] (every group, combined)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def is_placeholder(path: str) -> bool:
    """Globs, `<...>`, `...` and ALL-CAPS names such as OUT.json or NAME stand for paths; they are not checked."""
    if any(c in path for c in "*?<>") or "..." in path or "…" in path:
        return True
    for part in path.split("/"):
        stem = part.split(".")[0]
        if len(stem) >= 2 and stem.replace("_", "").isupper() and stem not in KNOWN_CAPS:
            return True
    return False


def find_paths(text: str) -> list[tuple[str, str | None]]:
    """Repository paths written in `text`, braces expanded, placeholders left out, trailing punctuation trimmed:
    [(path, what follows it: a markdown `#anchor`, a Python `::function`, or None)]."""
    found: list[tuple[str, str | None]] = []
    for m in PATH_RE.finditer(text):
        path = m.group("path").rstrip(".,;:")
        if is_placeholder(path):
            continue
        part = None
        if m.group("anchor"):
            part = f"#{m.group('anchor')}"
        elif m.group("function"):
            part = f"::{m.group('function')}"
        found.extend((p, part) for p in expand_braces(path))
    return found


def split_markdown(text: str) -> tuple[str, list[str]]:
    """(prose with fenced blocks blanked out, [fenced block contents])."""
    prose: list[str] = []
    blocks: list[str] = []
    block: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        m = FENCE_RE.match(line)
        if fence is None and m:
            fence, block = m.group(1), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            blocks.append("\n".join(block))
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def markdown_links(text: str) -> list[str]:
    """Link targets in markdown prose (not in code)."""
    prose, _ = split_markdown(text)
    return [m.group("target") for m in LINK_RE.finditer(CODE_SPAN_RE.sub("", prose))]


def markdown_code_paths(text: str) -> list[tuple[str, str | None]]:
    """Repository paths written in inline code spans and fenced blocks."""
    prose, blocks = split_markdown(text)
    spans = [m.group(1) for m in CODE_SPAN_RE.finditer(prose)]
    return [found for chunk in spans + blocks for found in find_paths(chunk)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text (repeated headings get -1, -2, ...)."""
    prose, _ = split_markdown(text)
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


# --- checks ----------------------------------------------------------------------------------------------------------


def check_target(path: str, part: str | None, base: Path, root: Path) -> str | None:
    """What is wrong with `path` (relative to `base`) and the `#anchor` or `::function` after it, or None."""
    target = (base / path).resolve()
    if not target.is_relative_to(root):
        return f"{path} leaves the repository"
    if not target.exists():
        return f"{path} does not exist"
    if not part or not target.is_file():
        return None
    if part.startswith("#") and target.suffix == ".md" and part[1:] not in anchors(target.read_text(encoding="utf-8")):
        return f"{path}{part}: no such heading"
    defines = re.compile(rf"^\s*(async\s+)?def {re.escape(part[2:])}\b", re.MULTILINE)
    if part.startswith("::") and target.suffix == ".py" and not defines.search(target.read_text(encoding="utf-8")):
        return f"{path}{part}: no such function"
    return None


def check_markdown(text: str, source: Path, root: Path) -> list[str]:
    """Broken links and paths of one markdown file, as 'file: problem' lines."""
    problems = []
    rel = source.relative_to(root) if source.is_relative_to(root) else source
    for target in markdown_links(text):
        if SCHEME_RE.match(target) or target.startswith("//"):
            continue
        path, _, anchor = target.partition("#")
        if not path:  # an anchor in this file
            if anchor not in anchors(text):
                problems.append(f"{rel}: link #{anchor}: no such heading")
            continue
        problem = check_target(path, f"#{anchor}" if anchor else None, source.parent, root)
        if problem:
            problems.append(f"{rel}: link {problem}")
    for code_path, part in markdown_code_paths(text):
        problem = check_target(code_path, part, root, root)
        if problem:
            problems.append(f"{rel}: code path {problem}")
    return problems


def repo_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), or a walk that skips build and cache folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [root / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and d != "runs"]
            files.extend(Path(dirpath) / f for f in filenames)
    return [f for f in files if f.is_file() and f.name not in NOT_SCANNED]


def python_comments(source: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of every comment block (consecutive comment lines, `#` stripped) and every docstring of a
    Python file."""
    block: list[str] = []
    first = last = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            row = tok.start[0]
            if block and row != last + 1:
                yield first, "\n".join(block)
                block = []
            if not block:
                first = row
            block.append(tok.string.lstrip("#").strip())
            last = row
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        yield first, "\n".join(block)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            doc = body[0] if body else None
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                yield doc.lineno, doc.value.value


def check_python(source: str, name: str, root: Path) -> list[str]:
    """Paths in one Python file's comments and docstrings that do not exist, and docs sections they name
    (`docs/design.md, Method`) that are not headings of that page."""
    problems: list[tuple[int, str]] = []
    for first, text in python_comments(source):
        for m in PATH_RE.finditer(text):
            line = first + text.count("\n", 0, m.start())
            for path, part in find_paths(m.group(0)):
                problem = check_target(path, part, root, root) if path.endswith(CODE_EXTENSIONS) else None
                if problem:
                    problems.append((line, f"{name}:{line}: {problem}"))
        for m in SECTION_RE.finditer(text):
            line = first + text.count("\n", 0, m.start())
            page = root / m.group("page")
            section = " ".join(m.group("section").split())
            if page.is_file() and slug(section) not in anchors(page.read_text(encoding="utf-8")):
                problems.append((line, f"{name}:{line}: {m.group('page')} has no section {section!r}"))
    return [problem for _, problem in sorted(problems)]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- tests -----------------------------------------------------------------------------------------------------------


def test_the_extractor_finds_paths_and_links_and_leaves_the_rest() -> None:
    text = (
        "See [the API](docs/api.md#status-codes), [home](https://example.com/x.md) and [up](#top).\n"
        "Run `tandem bench --prompts prompts/bench.jsonl --json OUT.json` or `experiments/block_cost.py 4`;\n"
        "`results/loadtest/sweep_cpu.{json,md}`, `results/loadtest/*.json`, `tests/unit/test_a.py::test_b`,\n"
        "`~/.cache/tandem`, `/tmp/tandem/x.json`, `runs/ft/export/tandem/`, `results/<name>.json`, `tandem.model`.\n"
        "```bash\n.venv/bin/python experiments/service_split.py /tmp/tandem.json\n```\n"
    )
    assert markdown_links(text) == ["docs/api.md#status-codes", "https://example.com/x.md", "#top"]
    assert markdown_code_paths(text) == [
        ("prompts/bench.jsonl", None),
        ("experiments/block_cost.py", None),
        ("results/loadtest/sweep_cpu.json", None),
        ("results/loadtest/sweep_cpu.md", None),
        ("tests/unit/test_a.py", "::test_b"),
        ("experiments/service_split.py", None),
    ]
    assert find_paths("# see docs/design.md#method, then bench/old.py.") == [
        ("docs/design.md", "#method"),
        ("bench/old.py", None),
    ]
    assert slug("5. Evaluate `tandem eval`") == "5-evaluate-tandem-eval"
    assert slug("Measured facts about the CPU") == "measured-facts-about-the-cpu"


def test_the_checker_reports_broken_links_and_paths(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Known section\n", encoding="utf-8")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "bench.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_known() -> None:\n    pass\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    good = (
        "[a](docs/a.md) [b](docs/a.md#known-section) `prompts/bench.jsonl` [c](#readme)\n"
        "`tests/test_x.py::test_known`\n# README\n"
    )
    assert check_markdown(good, readme, tmp_path) == []
    bad = (
        "[a](docs/missing.md) [b](docs/a.md#nowhere) `prompts/tune.jsonl` [c](../../outside.md)\n"
        "`tests/test_x.py::test_gone`\n"
    )
    assert check_markdown(bad, readme, tmp_path) == [
        "README.md: link docs/missing.md does not exist",
        "README.md: link docs/a.md#nowhere: no such heading",
        "README.md: link ../../outside.md leaves the repository",
        "README.md: code path prompts/tune.jsonl does not exist",
        "README.md: code path tests/test_x.py::test_gone: no such function",
    ]
    code = (
        '"""Module: see docs/a.md#known-section and\ndocs/a.md, Known section; docs/a.md, Other section."""\n\n'
        "x = 1  # measured in experiments/gone.py\n"
        "# (docs/a.md,\n# Known\n# section)\n"
    )
    assert check_python(code, "m.py", tmp_path) == [
        "m.py:2: docs/a.md has no section 'Other section'",
        "m.py:4: experiments/gone.py does not exist",
    ]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_in_the_docs_resolves(doc: Path) -> None:
    assert doc.exists(), f"{doc.relative_to(ROOT)} is missing"
    assert check_markdown(doc.read_text(encoding="utf-8"), doc, ROOT) == []


def test_paths_in_python_comments_and_docstrings_exist() -> None:
    problems = []
    for f in repo_files(ROOT):
        rel = f.relative_to(ROOT).as_posix()
        if f.suffix != ".py" or re.match(r"tandemrpc/v1/.*_pb2", rel):
            continue
        problems += check_python(f.read_text(encoding="utf-8"), rel, ROOT)
    assert problems == []


def test_no_file_names_the_retired_background_notes() -> None:
    pattern = re.compile("|".join(re.escape(n) for n in RETIRED_NOTES))
    hits = []
    for f in repo_files(ROOT):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (weights, plots)
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{f.relative_to(ROOT).as_posix()}:{number}: {line.strip()[:100]}")
    assert hits == []
