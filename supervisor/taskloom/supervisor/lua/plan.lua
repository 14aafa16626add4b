-- Store a plan's subtasks and start the task: each subtask's hash, the list
-- of ids, the task's counters, plan.created and a subtask.ready event for
-- each subtask without dependencies. One script instead of several commands
-- per subtask: a 20,000-subtask plan is one round trip, not 60,000 queued
-- commands. Runs inside the caller's MULTI, whose WATCH fences it (the
-- caller passes no token).
-- PAYLOAD: {task, priority, result_from (ids), subtasks}, each subtask
--   {id, title, instruction, capability, deps (ids), params_json,
--    max_attempts, timeout, tolerant (0|1)}
-- Returns the number of READY subtasks.
local task, result_from, subtasks = PAYLOAD[1], PAYLOAD[3], PAYLOAD[4]

-- cjson writes an empty table as {}; the readers want a JSON list.
local function ids_json(ids)
  if #ids == 0 then return '[]' end
  return cjson.encode(ids)
end

local dependents = {}
for _, s in ipairs(subtasks) do
  for _, dep in ipairs(s[5]) do
    local list = dependents[dep]
    if list == nil then list = {}; dependents[dep] = list end
    table.insert(list, s[1])
  end
end

local subs = k_subtasks(task)
redis.call('DEL', subs)
local chunk = {}
for i, s in ipairs(subtasks) do
  table.insert(chunk, s[1])
  if #chunk == 1000 or i == #subtasks then
    redis.call('RPUSH', subs, unpack(chunk))
    chunk = {}
  end
end

local ready = {}
for _, s in ipairs(subtasks) do
  local status = 'PENDING'
  if #s[5] == 0 then status = 'READY'; table.insert(ready, s[1]) end
  redis.call('HSET', k_subtask(task, s[1]),
    'id', s[1], 'title', s[2], 'instruction', s[3], 'capability', s[4],
    'deps', ids_json(s[5]), 'dependents', ids_json(dependents[s[1]] or {}),
    'pending', #s[5], 'params', s[6], 'status', status, 'attempt', 0,
    'max_attempts', s[7], 'timeout', s[8], 'tolerant', s[9], 'created_at', NOW)
end

redis.call('HSET', k_task(task), 'status', 'RUNNING', 'total', #subtasks, 'succeeded', 0,
  'settled', 0, 'result_from', ids_json(result_from), 'updated_at', NOW)
emit(task, 'plan.created', '', 'RUNNING', 'plan with ' .. #subtasks .. ' subtasks')
for _, sub in ipairs(ready) do
  emit(task, 'subtask.ready', sub, 'READY', '')
end
return #ready
