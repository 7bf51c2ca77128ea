"""The documentation holds together: every relative link in a Markdown file names a file of the
repository (and, with ``#anchor``, a heading of it), a "design.md section N" names a section design.md
has, and no file speaks of ticket numbers or of how the work was organised."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "__pycache__", ".pytest_cache"}


def repo_files(*suffixes: str) -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*")
        if path.is_file()
        and path.suffix in suffixes
        and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts[:-1])
        and not any(part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)
    )


MARKDOWN = repo_files(".md")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where ``](...)`` is code, not a link."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``: lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2``, ... after repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def links(path: Path) -> list[str]:
    return [target.split()[0] for target in re.findall(r"\]\(([^)\s]+(?:\s+\"[^\"]*\")?)\)", prose(path.read_text()))]


def test_the_docs_are_found():
    names = {str(p.relative_to(ROOT)) for p in MARKDOWN}
    assert {"README.md", "docs/usage.md", "docs/design.md", "docs/guarantees.md", "docs/kernels.md"} <= names
    assert {"examples/README.md", "benchmarks/README.md"} <= names


def test_the_readme_links_every_doc():
    readme_links = {target.split("#")[0] for target in links(ROOT / "README.md")}
    docs = {str(p.relative_to(ROOT)) for p in MARKDOWN if p.parent == ROOT / "docs"}
    assert docs | {"examples/README.md", "benchmarks/README.md"} <= readme_links


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


# What a reader of the code or the docs should never meet: ticket numbers ("issue 12", "issue #12",
# "PR #3") and words about how the work was organised. This file, which holds the examples, is exempt.
PROCESS_WORDS = re.compile(
    r"\b(?:issues?|tickets?)[\s#-]*\d+|\bPR\s*#\d+"
    r"|\bthe lead\b|\bworking log\b|\bNOTES\.md\b|\bhelper session|\bwork ?tree\b",
    re.I,
)


def code_and_docs() -> list[Path]:
    return repo_files(".py", ".md", ".toml", ".cfg", ".cu", ".cpp", ".h", ".sh", ".txt", ".yml", ".yaml") + [
        ROOT / ".ci" / "run"
    ]


def test_the_process_word_pattern_catches_what_it_should():
    for text in ("see issue 12", "Issue #7", "issue-3", "ticket 4", "PR #5", "as the lead said", "the working log"):
        assert PROCESS_WORDS.search(text), text
    for text in ("issued 2 loads", "scope='session'", "tests/helpers.py", "an issue with 2 GPUs"):
        assert not PROCESS_WORDS.search(text), text


def test_no_ticket_numbers_or_process_words_in_code_or_docs():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in code_and_docs()
        if path.is_file() and path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if PROCESS_WORDS.search(line)
    ]
    assert not found, "\n".join(found)


def numbered_sections(markdown: str) -> set[int]:
    return {int(n) for n in re.findall(r"^##\s+(\d+)\.", markdown, flags=re.M)}


def test_design_section_references_exist():
    """"design.md section N" (in code, tests and docs) names a numbered section design.md has."""
    sections = numbered_sections((ROOT / "docs" / "design.md").read_text())
    reference = re.compile(r"design\.md\)?,? (?:\(?sections? )(\d+)|sections? (\d+) of \[?(?:docs/)?design\.md")
    wrong = [
        f"{path.relative_to(ROOT)}:{number}: section {cited}"
        for path in code_and_docs()
        if path.is_file() and path.name != "compile_matrix.md"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for match in reference.finditer(line)
        for cited in [int(match.group(1) or match.group(2))]
        if cited not in sections
    ]
    assert sections and not wrong, "\n".join(wrong)
