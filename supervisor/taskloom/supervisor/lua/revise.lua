-- Replace a subtask that failed for good with subtasks the planner wrote.
-- The failed subtask stays FAILED; its dependents now wait for the new
-- subtasks that nothing else in the replacement depends on (its sinks), and
-- the task's result takes them where it took the failed one. Finished
-- subtasks never change. The graph's version goes up by one.
-- Returns ReviseReply: ok = 0 if the task moved on, and the new subtasks
-- that are READY.
local task, failed, version, rows, sinks, message = unpack(PAYLOAD) -- ReviseArgs
local tk, fk = k_task(task), k_subtask(task, failed)
if redis.call('HGET', tk, 'status') ~= 'RUNNING'
    or tonumber(redis.call('HGET', tk, 'version') or '1') ~= version
    or redis.call('HGET', tk, 'replan_pending') ~= failed then
  return cjson.encode({ok = 0, ready = {}})
end
local priority = tonumber(redis.call('HGET', tk, 'priority') or '0')
local is_new, dependents = {}, {}
for _, row in ipairs(rows) do
  local id = unpack(row) -- SubtaskRow
  is_new[id] = true
  dependents[id] = {}
end
for _, row in ipairs(rows) do
  local id, _, _, _, deps = unpack(row) -- SubtaskRow
  for _, dep in ipairs(deps) do
    dependents[dep] = dependents[dep] or {}
    table.insert(dependents[dep], id)
  end
end
-- The failed step's dependents depend on the sinks instead.
local waiting = cjson.decode(redis.call('HGET', fk, 'dependents') or '[]')
for _, x in ipairs(waiting) do
  local xk = k_subtask(task, x)
  local deps = {}
  for _, d in ipairs(cjson.decode(redis.call('HGET', xk, 'deps') or '[]')) do
    if d ~= failed then table.insert(deps, d) end
  end
  for _, sink in ipairs(sinks) do
    table.insert(deps, sink)
    table.insert(dependents[sink], x)
  end
  redis.call('HSET', xk, 'deps', cjson.encode(deps))
  redis.call('HINCRBY', xk, 'pending', #sinks - 1)
end
-- Existing subtasks the new ones depend on, not yet done, must tell them.
for dep, list in pairs(dependents) do
  if not is_new[dep] then
    local dk = k_subtask(task, dep)
    if redis.call('HGET', dk, 'status') ~= 'SUCCEEDED' then
      local mine = cjson.decode(redis.call('HGET', dk, 'dependents') or '[]')
      for _, d in ipairs(list) do table.insert(mine, d) end
      redis.call('HSET', dk, 'dependents', cjson.encode(mine))
    end
  end
end
-- The new subtasks whose dependencies are all done start at once, unless a
-- person approves each plan of the task: then the revised plan waits too.
local hold = redis.call('HGET', tk, 'approve_plan') == '1'
local fresh = {}
for _, row in ipairs(rows) do
  local id, title, instruction, capability, deps, params, max_attempts, timeout, _, gated =
    unpack(row) -- SubtaskRow
  local pending = 0
  for _, dep in ipairs(deps) do
    local d = is_new[dep] and {'PENDING'} or redis.call('HMGET', k_subtask(task, dep), 'status',
      'provided')
    if not satisfied(d[1], d[2], false) then
      pending = pending + 1
    end
  end
  redis.call('HSET', k_subtask(task, id), 'id', id, 'title', title, 'instruction', instruction,
    'capability', capability, 'deps', cjson.encode(deps),
    'dependents', cjson.encode(dependents[id]),
    'pending', pending, 'params', params, 'status', 'PENDING', 'attempt', 0,
    'max_attempts', max_attempts, 'timeout', timeout, 'tolerant', 0, 'gated', gated,
    'created_at', NOW)
  redis.call('RPUSH', k_subtasks(task), id)
  if pending == 0 then table.insert(fresh, {id, capability, gated == 1}) end
end
local from = cjson.decode(redis.call('HGET', tk, 'result_from') or '[]')
local result_from = {}
for _, sub in ipairs(from) do
  if sub == failed then
    for _, sink in ipairs(sinks) do table.insert(result_from, sink) end
  else
    table.insert(result_from, sub)
  end
end
redis.call('HSET', tk, 'result_from', cjson.encode(result_from), 'version', version + 1,
  'replan_pending', '', 'updated_at', NOW)
redis.call('HINCRBY', tk, 'total', #rows)
account(task, #rows, rows_size(rows))
redis.call('HINCRBY', tk, 'settled', 1)
redis.call('HINCRBY', tk, 'replans', 1)
local ready = {}
if hold then
  TASK_STATUS[task] = 'AWAITING_APPROVAL'
  redis.call('HSET', tk, 'status', 'AWAITING_APPROVAL', 'awaiting_since', NOW)
  emit(task, 'plan.revised', '', 'AWAITING_APPROVAL', message, 0, '')
  emit(task, 'task.awaiting_approval', '', 'AWAITING_APPROVAL',
    'the revised plan waits for a person to approve it; what runs finishes meanwhile')
  table.insert(AWAITING, {task, ''})
else
  emit(task, 'plan.revised', '', 'RUNNING', message, 0, '')
  for _, item in ipairs(fresh) do
    make_ready(task, item[1], item[2], priority, ready, '', item[3])
  end
end
return cjson.encode({ok = 1, ready = ready, awaiting = AWAITING})
