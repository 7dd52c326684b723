"""Every ``methods.md §x`` citation in the code, recipes and data-prep scripts resolves.

Citations name a heading of ``docs/methods.md`` (``## §1 ...``, ``### §1.2 ...``,
``#### §5.3a ...``). Both spellings, ``docs/methods.md §x`` and ``docs/methods.md §x``, are checked;
a run such as ``methods.md §1.8, §6.1`` or ``§2.5-§2.7`` checks every section it lists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "methods.md"
SCANNED = ("mimscale", "recipes", "data_prep")
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".sbatch"}

HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)?[a-z]?)\s", re.MULTILINE)
# "methods.md" (either case), then one or more "§x" joined by commas, slashes, dashes or "and".
CITATION = re.compile(r"methods\.md\s*((?:(?:,|/|-|–|and|\s)*§\d+(?:\.\d+)?[a-z]?)+)", re.IGNORECASE)
SECTION = re.compile(r"§(\d+(?:\.\d+)?[a-z]?)")


def headings(text: str) -> set[str]:
    """The section ids (``"1"``, ``"1.2"``, ``"5.3a"``) that ``text`` has headings for."""
    return set(HEADING.findall(text))


def citations(text: str) -> list[str]:
    """Every section id cited as ``methods.md §x`` in ``text``, in order."""
    return [s for run in CITATION.findall(text) for s in SECTION.findall(run)]


def cited_sections() -> list[tuple[str, int, str]]:
    """(file, line, section) for every citation under the scanned folders."""
    out = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in SUFFIXES or not path.is_file():
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                out += [(str(path.relative_to(REPO)), i, s) for s in citations(line)]
    return out


def test_parsers_on_known_forms() -> None:
    assert citations("see docs/methods.md §1.8, §6.1 and docs/methods.md §5.3c.") == ["1.8", "6.1", "5.3c"]
    assert citations("(docs/methods.md §2.5-§2.7)") == ["2.5", "2.7"]
    assert citations("docs/methods.md §2.9 item 3; §4 elsewhere") == ["2.9"]
    assert citations("methods.md §1.3. The encoder") == ["1.3"]
    assert headings("## §1 Shared\n### §1.2 Init\n#### §5.3a L_spa\n# §9 no\n") == {"1", "1.2", "5.3a"}


def test_every_citation_names_a_heading() -> None:
    known = headings(DOC.read_text(encoding="utf-8"))
    cites = cited_sections()
    assert len(cites) > 50, "the scan found suspiciously few citations"
    dead = [f"{f}:{i}: §{s}" for f, i, s in cites if s not in known]
    assert not dead, "citations without a heading in docs/methods.md:\n" + "\n".join(dead)


@pytest.mark.parametrize("section", ["1.2", "1.3", "2.9", "3.5", "5.3a", "5.3b", "5.3c", "6.1", "6.10"])
def test_doc_has_the_sections_the_code_leans_on(section: str) -> None:
    assert section in headings(DOC.read_text(encoding="utf-8"))
