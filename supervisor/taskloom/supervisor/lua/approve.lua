-- A person approves: a plan that waits (sub ''), which starts the task --
-- with `plan`, after replacing it, which only a plan nothing of has run may
-- be -- or a subtask that waits, which then runs. Returns ControlReply.
local task, sub, actor, reason, plan = unpack(PAYLOAD) -- ApproveArgs
local tk = k_task(task)
local tstatus = redis.call('HGET', tk, 'status')
if not tstatus then
  return cjson.encode({task_status = ''})
end
local why = 'approved ' .. by(actor, reason)
local ready, finished = {}, {}
local found = ''
if sub == '' then
  if tstatus ~= 'AWAITING_APPROVAL' then
    return cjson.encode({task_status = tstatus, conflict = 1, refused = 'task ' .. task ..
      ' is ' .. tstatus .. '; only a task whose plan waits for approval can be approved'})
  end
  local since = tonumber(redis.call('HGET', tk, 'awaiting_since') or '') or tonumber(NOW)
  local priority = priority_of(task)
  if plan then
    local subs = redis.call('LRANGE', k_subtasks(task), 0, -1)
    for _, s in ipairs(subs) do
      local v = redis.call('HMGET', k_subtask(task, s), 'status', 'attempt')
      if v[1] ~= 'PENDING' or tonumber(v[2] or '0') > 0 then
        return cjson.encode({task_status = tstatus, conflict = 1, refused = 'the plan of task ' ..
          task .. ' can be replaced only before any of it has run; approve it, or retry ' ..
          'and skip subtasks once it runs'})
      end
    end
    for _, s in ipairs(subs) do redis.call('DEL', k_subtask(task, s)) end
    local result_from, rows = unpack(plan) -- PlanArgs
    emit(task, 'plan.edited', '', tstatus, why .. '; the plan was replaced by one of ' .. #rows ..
      ' subtasks', 0, '', '', actor)
    local capability = {}
    for _, row in ipairs(rows) do capability[row[1]] = row[4] end
    for _, id in ipairs(store_plan(task, result_from, rows, false)) do
      table.insert(ready, {task, id, capability[id], priority})
    end
    redis.call('HSET', tk, 'awaiting_since', '', 'version', 1)
  else
    TASK_STATUS[task] = 'RUNNING'
    redis.call('HSET', tk, 'status', 'RUNNING', 'awaiting_since', '', 'updated_at', NOW)
    emit(task, 'plan.approved', '', 'RUNNING', why, 0, '', '', actor)
    for _, s in ipairs(redis.call('LRANGE', k_subtasks(task), 0, -1)) do
      local v = redis.call('HMGET', k_subtask(task, s), 'status', 'pending', 'capability',
        'gated', 'approved')
      if v[1] == 'PENDING' and tonumber(v[2] or '0') <= 0 then
        make_ready(task, s, v[3], priority, ready, '', gated_now(v[4], v[5]))
      elseif v[1] == 'READY' then
        -- Made READY while the plan waited (a running dependency finished).
        table.insert(ready, {task, s, v[3], priority})
      end
    end
    settle(task, finished)
  end
  table.insert(APPROVED, {task, '', math.max(0, tonumber(NOW) - since)})
else
  local sk = k_subtask(task, sub)
  local v = redis.call('HMGET', sk, 'status', 'capability', 'ready_at')
  if not v[1] then
    return cjson.encode({task_status = tstatus, sub_status = '',
      refused = 'task ' .. task .. ' has no subtask ' .. sub})
  end
  found = v[1]
  if v[1] ~= 'AWAITING_APPROVAL' or tstatus ~= 'RUNNING' then
    return cjson.encode({task_status = tstatus, sub_status = v[1], conflict = 1,
      refused = 'subtask ' .. sub .. ' is ' .. v[1] .. ' in a task that is ' .. tstatus ..
      '; only a subtask waiting for approval in a running task can be approved'})
  end
  redis.call('HSET', sk, 'approved', '1')
  emit(task, 'subtask.approved', sub, 'AWAITING_APPROVAL', why, 0, '', '', actor)
  make_ready(task, sub, v[2], priority_of(task), ready, why, false)
  local since = tonumber(v[3] or '') or tonumber(NOW)
  table.insert(APPROVED, {task, sub, math.max(0, tonumber(NOW) - since)})
end
redis.call('HSET', tk, 'updated_at', NOW)
return cjson.encode({task_status = tstatus, sub_status = found, ready = ready,
  finished = finished, statuses = statuses_of(finished), ended = ENDED, awaiting = AWAITING,
  approved = APPROVED})
