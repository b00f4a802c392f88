"""The docs: the config reference is the schema's (regenerated and compared), every field has a
comment, and every relative link of README.md and docs/*.md reaches a file."""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

from conf import reference

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_config_reference_matches_the_schema() -> None:
    page = REPO / "docs" / "config.md"
    assert page.is_file(), f"docs/config.md is missing: run `{reference.COMMAND}`"
    assert page.read_text() == reference.render(), (
        f"docs/config.md differs from the schema (a key, default or comment changed): run `{reference.COMMAND}`"
    )


def test_a_field_without_a_comment_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "docs_fields.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            @dataclass
            class Group:
                said: int = 1  # what it means
                # the comment lines above a field count too
                above: int = 2
                silent: int = 3
            """
        )
    )
    spec = importlib.util.spec_from_file_location("docs_fields", tmp_path / "docs_fields.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "docs_fields", module)  # inspect finds the source through it
    spec.loader.exec_module(module)
    group = module.Group
    assert reference.field_comment(group, "said") == "what it means"
    assert reference.field_comment(group, "above") == "the comment lines above a field count too"
    with pytest.raises(reference.DocError, match="Group.silent has no comment"):
        reference.field_comment(group, "silent")


def test_relative_links_reach_files() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor of the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "links to missing files: " + ", ".join(broken)
