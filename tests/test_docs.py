"""docs/ is the reference: every option of every command's --help is documented there, and the README's links
lead somewhere."""

from __future__ import annotations

import re

import pytest

from helpers import ROOT

DOCS = ROOT / "docs"


def _options() -> list[tuple[str, str]]:
    import typer.main

    from siglip_cli.cli import app

    group = typer.main.get_command(app)
    out = []
    for name, command in sorted(group.commands.items()):
        for param in command.params:
            out += [(name, o) for o in param.opts if o.startswith("--") and o != "--help"]
    return out


@pytest.mark.parametrize(("command", "option"), _options())
def test_every_option_is_documented(command, option):
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    assert re.search(rf"(`|, ){re.escape(option)}[ `=\\|,]", text), f"siglip {command} {option} is not in docs/"


def test_links_of_the_readme_and_docs_lead_somewhere():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which is not there"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
