"""Every Redis key taskloom uses, in one place.

All keys share one prefix (``TASKLOOM_REDIS_PREFIX``, default ``taskloom:``),
so a deployment, a test or later a partition of tasks is a prefix. The Lua
scripts get the same key builders, generated from the templates below by
``lua_prelude``, so the scheme is never written twice.

    {prefix}task:{task}              hash    the task's fields
    {prefix}task:{task}:subs         list    its subtask ids in plan order
    {prefix}task:{task}:sub:{sub}    hash    one subtask's fields
    {prefix}task:{task}:events       stream  the task's event log
    {prefix}task:{task}:archive      string  a finished task's subtasks and log, compacted
    {prefix}tasks                    zset    every task, scored by creation time
    {prefix}active                   zset    tasks not yet finished (for recovery)
    {prefix}finished                 zset    finished tasks, scored by finish time
    {prefix}idem:{key}               string  idempotency key → task id
    {prefix}leader                   string  the leader lease: its fencing token (PX ttl)
    {prefix}leader:epoch             string  counter; each new lease takes the next number
    {prefix}deadlines                zset    tasks with a max_duration, scored by when it ends
    {prefix}cache:{key}              string  a cached subtask output (key: SHA-1 of its inputs)
    {prefix}rate:{key}               hash    a rate limit's token bucket (key: its model pattern)
    {prefix}owner:{key}:tasks        zset    one principal's tasks, scored by creation time
    {prefix}owner:{key}:active       zset    its unfinished tasks (for the in-flight limit)
    {prefix}owners                   set     principals that own tasks (to trim their indexes)
    {prefix}owner:{key}:usage        hash    its unfinished subtasks and stored bytes (budgets)
    {prefix}sizes                    hash    finished task → "bytes owner", until it expires
    {prefix}staging                  zset    tasks whose large plan is being written, by start
    {prefix}hub:{id}                 stream  wakes one supervisor's event hub (short-lived)
    {prefix}compact                  zset    finished tasks not yet compacted, by finish time

A finished task is compacted a while after it ends (``TASKLOOM_COMPACT_AFTER``):
its subtask hashes and its event log become one string, ``archive`` (zlib,
base64), and its hash says ``archived``; readers and the one script that can
run a finished task again (``rework``) know both forms.

The fields of the task and subtask hashes and of the event entries are
listed in ``records``.
"""

from __future__ import annotations

REDIS_TIMEOUT = 10.0
"""How long a Redis command may go unanswered before the call fails (seconds).
The leader lease must be shorter (``SupervisorSettings.leader_ttl``)."""

_TEMPLATES = {
    "task": "task:{task}",
    "subtasks": "task:{task}:subs",
    "subtask": "task:{task}:sub:{sub}",
    "events": "task:{task}:events",
    "archive": "task:{task}:archive",
    "tasks_index": "tasks",
    "active_index": "active",
    "finished_index": "finished",
    "idempotency": "idem:{key}",
    "leader": "leader",
    "leader_epoch": "leader:epoch",
    "deadlines": "deadlines",
    "cache": "cache:{key}",
    "rate": "rate:{key}",
    "owner_tasks": "owner:{key}:tasks",
    "owner_active": "owner:{key}:active",
    "owners": "owners",
    "owner_usage": "owner:{key}:usage",
    "sizes": "sizes",
    "staging": "staging",
    "hub": "hub:{key}",
    "compact": "compact",
}


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tasks_index = prefix + _TEMPLATES["tasks_index"]
        self.active_index = prefix + _TEMPLATES["active_index"]
        self.finished_index = prefix + _TEMPLATES["finished_index"]
        self.leader = prefix + _TEMPLATES["leader"]
        self.leader_epoch = prefix + _TEMPLATES["leader_epoch"]
        self.deadlines = prefix + _TEMPLATES["deadlines"]
        self.owners = prefix + _TEMPLATES["owners"]
        self.sizes = prefix + _TEMPLATES["sizes"]
        self.staging = prefix + _TEMPLATES["staging"]
        self.compact = prefix + _TEMPLATES["compact"]

    def task(self, task: str) -> str:
        return self.prefix + _TEMPLATES["task"].format(task=task)

    def subtasks(self, task: str) -> str:
        return self.prefix + _TEMPLATES["subtasks"].format(task=task)

    def subtask(self, task: str, sub: str) -> str:
        return self.prefix + _TEMPLATES["subtask"].format(task=task, sub=sub)

    def events(self, task: str) -> str:
        return self.prefix + _TEMPLATES["events"].format(task=task)

    def archive(self, task: str) -> str:
        return self.prefix + _TEMPLATES["archive"].format(task=task)

    def idempotency(self, key: str) -> str:
        return self.prefix + _TEMPLATES["idempotency"].format(key=key)

    def task_of_events(self, key: str) -> str:
        """The task whose event stream ``key`` is."""
        head, _, tail = _TEMPLATES["events"].partition("{task}")
        return key.removeprefix(self.prefix + head).removesuffix(tail)

    def owner_tasks(self, owner: str) -> str:
        return self.prefix + _TEMPLATES["owner_tasks"].format(key=owner)

    def owner_active(self, owner: str) -> str:
        return self.prefix + _TEMPLATES["owner_active"].format(key=owner)

    def owner_usage(self, owner: str) -> str:
        return self.prefix + _TEMPLATES["owner_usage"].format(key=owner)

    def hub(self, supervisor: str) -> str:
        """The stream that wakes one supervisor's event hub."""
        return self.prefix + _TEMPLATES["hub"].format(key=supervisor)


def lua_prelude() -> str:
    """Lua functions ``k_task(t)``, ``k_subtask(t, s)``, ... built from the templates.

    The scripts take the prefix as ARGV[1]; keys are derived inside the script
    because a transition touches keys (dependents, the synthesis step) that
    are only known once the script has read the subtask.
    """
    lines = ["local PREFIX = ARGV[1]"]
    for name, template in _TEMPLATES.items():
        params = [p for p in ("task", "sub", "key") if "{" + p + "}" in template]
        body = "PREFIX .. '" + template + "'"
        for p in params:
            body = body.replace("{" + p + "}", "' .. " + p + " .. '")
        body = body.replace(" .. ''", "")
        lines.append(f"local function k_{name}({', '.join(params)}) return {body} end")
    return "\n".join(lines) + "\n"
