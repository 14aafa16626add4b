-- Assign READY subtasks to workers: READY -> ASSIGNED with attempt + 1.
-- Written before the Assignment is sent, so a crash in between leaves an
-- ASSIGNED subtask whose lease expires, never a subtask nobody holds.
-- PAYLOAD: {{task, sub, worker_id, worker_name}, ...}
-- Returns JSON: {assigned = {{index, attempt, title, instruction, capability,
--   params, inputs = {{dep, title, output}, ...}, timeout, stall}, ...},
--   goals = {task = goal}}
local assigned, goals = {}, {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, worker_id, worker = item[1], item[2], item[3], item[4]
  local sk = k_subtask(task, sub)
  local st = redis.call('HMGET', sk, 'status', 'attempt', 'title', 'instruction',
    'capability', 'params', 'deps', 'timeout')
  -- A subtask can be queued twice (recovery racing a requeue); only the
  -- first assignment finds it READY.
  if st[1] == 'READY' and redis.call('HGET', k_task(task), 'status') == 'RUNNING' then
    local attempt = tonumber(st[2]) + 1
    redis.call('HSET', sk, 'status', 'ASSIGNED', 'attempt', attempt, 'worker', worker,
      'worker_id', worker_id, 'assigned_at', NOW, 'progress', '')
    emit(task, 'subtask.assigned', sub, 'ASSIGNED', 'assigned to ' .. worker, attempt, worker)
    local inputs = {}
    for _, dep in ipairs(cjson.decode(st[7])) do
      local dv = redis.call('HMGET', k_subtask(task, dep), 'title', 'output', 'status', 'error')
      local output = dv[2] or ''
      if dv[3] ~= 'SUCCEEDED' then
        -- Only a tolerant subtask (the synthesis step) runs after a dependency
        -- that did not succeed; it is told so rather than handed nothing.
        output = '[no output: this step ended ' .. tostring(dv[3]) .. ' (' .. (dv[4] or '') .. ')]'
      end
      table.insert(inputs, {dep, dv[1] or '', output})
    end
    if goals[task] == nil then
      goals[task] = redis.call('HGET', k_task(task), 'goal') or ''
    end
    table.insert(assigned, {i, attempt, st[3], st[4], st[5], st[6], inputs,
      tonumber(st[8] or '0'), tonumber(redis.call('HGET', k_task(task), 'stall') or '0')})
  end
end
return cjson.encode({assigned = assigned, goals = goals})
