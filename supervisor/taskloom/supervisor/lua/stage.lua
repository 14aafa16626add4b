-- Write part of a large plan before its task exists: its subtasks' hashes
-- and their ids, in plan order, each script a bounded part, so that no one
-- script holds Redis up for long. Nothing reads them until create.lua makes
-- the task visible (finish_staged); the janitor removes what a submit that
-- never got that far left behind (the staging index). Returns {ok = 1}.
local task, rows, dependents, hold = unpack(PAYLOAD) -- StageArgs
redis.call('ZADD', k_staging(), 'NX', NOW, task)
local ids = {}
for _, row in ipairs(rows) do
  local id, title, instruction, capability, deps, params, max_attempts, timeout, tolerant,
    gated = unpack(row) -- SubtaskRow
  local status, since = 'PENDING', ''
  if #deps == 0 and not hold then
    since = NOW
    status = 'READY'
    if gated == 1 then status = 'AWAITING_APPROVAL' end
  end
  redis.call('HSET', k_subtask(task, id),
    'id', id, 'title', title, 'instruction', instruction, 'capability', capability,
    'deps', ids_json(deps), 'dependents', ids_json(dependents[id] or {}),
    'pending', #deps, 'params', params, 'status', status, 'attempt', 0,
    'max_attempts', max_attempts, 'timeout', timeout, 'tolerant', tolerant, 'gated', gated,
    'ready_at', since, 'created_at', NOW)
  table.insert(ids, id)
end
if #ids > 0 then redis.call('RPUSH', k_subtasks(task), unpack(ids)) end
return cjson.encode({ok = 1})
