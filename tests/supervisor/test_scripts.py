"""The Lua scripts and the store name the same argument slots (scripts.py)."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from taskloom.supervisor import scripts

UNPACK = re.compile(r"local\s+([\w,\s]+?)\s*=\s*unpack\(\w+\)\s*--\s*(\w+)\s*$", re.MULTILINE)


def lua_sources() -> dict[str, str]:
    folder = resources.files("taskloom.supervisor").joinpath("lua")
    return {f.name: f.read_text() for f in folder.iterdir() if f.name.endswith(".lua")}


def unpacks() -> list[tuple[str, list[str], str]]:
    """Every ``local a, b = unpack(x) -- Type`` line: (file, names, type)."""
    found = []
    for name, source in lua_sources().items():
        # A statement may continue on the next line ("=\n  unpack(...)").
        joined = re.sub(r"=\s*\n\s*unpack", "= unpack", source)
        for match in UNPACK.finditer(joined):
            names = [n.strip() for n in match.group(1).split(",")]
            found.append((name, names, match.group(2)))
    return found


def test_every_script_has_a_source_and_every_source_is_a_script() -> None:
    assert {f"{s}.lua" for s in scripts.SCRIPTS} | {"lib.lua"} == set(lua_sources())


@pytest.mark.parametrize(("source", "names", "type_name"), unpacks())
def test_each_unpacking_names_the_slots_of_its_type_in_order(
    source: str, names: list[str], type_name: str
) -> None:
    cls = getattr(scripts, type_name, None)
    assert cls in scripts.PAYLOADS, f"{source}: {type_name} is not a payload type in scripts.py"
    fields = list(cls._fields)
    # A script may take a prefix of the slots, and skip some with "_".
    assert len(names) <= len(fields), f"{source}: more names than {type_name} has slots"
    for name, slot in zip(names, fields, strict=False):
        assert name in ("_", slot), f"{source}: {type_name} slot {slot!r} read as {name!r}"


def test_every_payload_type_is_read_by_some_script_and_no_script_reads_by_number() -> None:
    used = {type_name for _, _, type_name in unpacks()}
    assert {cls.__name__ for cls in scripts.PAYLOADS} <= used
    for name, source in lua_sources().items():
        assert not re.search(r"\bPAYLOAD\[|\bARGV\[[2-9]", source), name
