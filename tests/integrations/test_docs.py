"""The documentation holds together: every relative link in a Markdown file names a file of the
repository (and, with ``#anchor``, a heading of it), and no file speaks of ticket numbers."""

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


def test_no_ticket_numbers_in_code_or_docs():
    pattern = re.compile(r"\bissues?\s+#?\d+", re.I)
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in repo_files(".py", ".md", ".toml", ".cfg", ".cu", ".cpp")
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
