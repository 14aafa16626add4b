"""Roles: who does a step, as a system prompt for the model.

A role is a name, a line the planner reads to choose it, and the system prompt
an ``llm`` step runs with. The built-ins are ``researcher``, ``analyst``,
``writer`` and ``critic``; a TOML or JSON file (``TASKLOOM_ROLES_FILE``) adds
roles or replaces built-ins::

    [reviewer]
    description = "checks code for bugs and unclear names"
    prompt = "You are a meticulous code reviewer. ..."

The supervisor owns the roles: the planner is offered them and sets a step's
``role``; the supervisor adds the role's prompt to the step (params ``role``
and ``role_prompt``), so every ``llm`` worker can play every role and a role
file lives in one place. Where a step must run on particular machines, that
is what capabilities (and labels) are for, not roles.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskloom.core.errors import ConfigError

ROLE_PARAM = "role"
"""The param that names a step's role."""
ROLE_PROMPT_PARAM = "role_prompt"
"""The param the supervisor fills with the role's system prompt."""
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_DESCRIPTION = 200
MAX_PROMPT = 2000
"""A role's prompt travels in the step's params (at most 4,000 characters each)."""


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    description: str
    """What the planner reads to choose it."""
    prompt: str
    """The system prompt of the ``llm`` steps that play it."""


BUILTIN_ROLES: Mapping[str, Role] = {
    r.name: r
    for r in (
        Role(
            "researcher",
            "gathers facts, figures and sources on a question",
            "You are a careful researcher. Gather the facts, figures and examples the step "
            "asks for, say where each comes from when you know it, and say plainly what you "
            "do not know instead of guessing.",
        ),
        Role(
            "analyst",
            "compares, calculates and draws conclusions from what others found",
            "You are an analyst. Work from the results you are given: compare, calculate and "
            "draw conclusions, showing the figures your conclusions rest on.",
        ),
        Role(
            "writer",
            "turns notes and findings into clear prose for the reader",
            "You are a clear, plain writer. Turn what you are given into well-organised prose "
            "for the intended reader: short sentences, no filler, nothing invented.",
        ),
        Role(
            "critic",
            "reviews others' results for errors, gaps and weak arguments",
            "You are a demanding critic. Review the results you are given: name each error, "
            "gap or unsupported claim, say why it matters and how to fix it.",
        ),
    )
}


def load_roles(path: str | Path | None = None) -> dict[str, Role]:
    """The built-in roles, with those of the TOML or JSON file at ``path``
    added (a role of the same name replaces the built-in); ``ConfigError``
    saying what is wrong with the file."""
    roles = dict(BUILTIN_ROLES)
    if not path:
        return roles
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise ConfigError(f"TASKLOOM_ROLES_FILE: cannot read {file}: {e.strerror}") from None
    try:
        document: Any = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"TASKLOOM_ROLES_FILE: {file} is not valid TOML or JSON: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"TASKLOOM_ROLES_FILE: {file} must map role names to roles")
    for name, entry in document.items():
        where = f"TASKLOOM_ROLES_FILE: {file}: role {name!r}"
        if not NAME_RE.match(str(name)):
            raise ConfigError(f"{where}: a name is 1-32 lower-case letters, digits, '_' or '-'")
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ConfigError(f"{where} needs a prompt (and a description)")
        prompt, description = entry["prompt"].strip(), str(entry.get("description", "")).strip()
        if not prompt or len(prompt) > MAX_PROMPT or len(description) > MAX_DESCRIPTION:
            raise ConfigError(
                f"{where}: the prompt has 1 to {MAX_PROMPT} characters, the description "
                f"at most {MAX_DESCRIPTION}"
            )
        roles[name] = Role(name, description or name, prompt)
    return roles
