"""Roles from the built-ins and a file (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskloom.core.errors import ConfigError
from taskloom.core.roles import BUILTIN_ROLES, load_roles


def test_the_built_ins_are_there_without_a_file() -> None:
    assert sorted(load_roles()) == ["analyst", "critic", "researcher", "writer"]
    assert all(r.prompt and r.description for r in BUILTIN_ROLES.values())


def test_a_file_adds_roles_and_replaces_built_ins(tmp_path: Path) -> None:
    toml = tmp_path / "roles.toml"
    toml.write_text(
        '[reviewer]\ndescription = "checks code"\nprompt = "You review code."\n'
        '[writer]\nprompt = "You write haiku only."\n'
    )
    roles = load_roles(toml)
    assert roles["reviewer"].prompt == "You review code."
    assert roles["reviewer"].description == "checks code"
    assert roles["writer"].prompt == "You write haiku only."
    assert "critic" in roles
    json_file = tmp_path / "roles.json"
    json_file.write_text('{"tester": {"prompt": "You test."}}')
    assert load_roles(json_file)["tester"].description == "tester"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not = [valid", "is not valid TOML or JSON"),
        ('[Big-Name]\nprompt = "x"', "a name is 1-32 lower-case letters"),
        ('[tester]\ndescription = "no prompt"', "role 'tester' needs a prompt"),
        (f'[tester]\nprompt = "{"x" * 2001}"', "the prompt has 1 to 2000 characters"),
    ],
)
def test_a_bad_roles_file_says_what_is_wrong(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "roles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_roles(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_roles(tmp_path / "missing.toml")
