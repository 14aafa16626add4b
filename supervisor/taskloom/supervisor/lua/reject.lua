-- A person rejects: a plan that waits (sub ''), which cancels the task, or a
-- subtask that waits, which is skipped with its dependents while the task
-- goes on (as with on_failure skip). Returns ControlReply.
local task, sub, actor, reason = unpack(PAYLOAD) -- RejectArgs
local tk = k_task(task)
local tstatus = redis.call('HGET', tk, 'status')
if not tstatus then
  return cjson.encode({task_status = ''})
end
local why = 'rejected ' .. by(actor, reason)
local ready, finished, held = {}, {}, {}
local found = ''
if sub == '' then
  if tstatus ~= 'AWAITING_APPROVAL' then
    return cjson.encode({task_status = tstatus, conflict = 1, refused = 'task ' .. task ..
      ' is ' .. tstatus .. '; only a task whose plan waits for approval can be rejected ' ..
      '(cancel it instead)'})
  end
  local since = tonumber(redis.call('HGET', tk, 'awaiting_since') or '') or tonumber(NOW)
  held = finish_task(task, 'CANCELLED', 'the plan was ' .. why, 'task.cancelled',
    'the plan was ' .. why, '', actor)
  table.insert(finished, task)
  table.insert(APPROVED, {task, '', math.max(0, tonumber(NOW) - since)})
else
  local sk = k_subtask(task, sub)
  local v = redis.call('HMGET', sk, 'status', 'ready_at')
  if not v[1] then
    return cjson.encode({task_status = tstatus, sub_status = '',
      refused = 'task ' .. task .. ' has no subtask ' .. sub})
  end
  found = v[1]
  if v[1] ~= 'AWAITING_APPROVAL' or tstatus ~= 'RUNNING' then
    return cjson.encode({task_status = tstatus, sub_status = v[1], conflict = 1,
      refused = 'subtask ' .. sub .. ' is ' .. v[1] .. ' in a task that is ' .. tstatus ..
      '; only a subtask waiting for approval in a running task can be rejected'})
  end
  redis.call('HSET', sk, 'status', 'SKIPPED', 'finished_at', NOW, 'error', why)
  emit(task, 'subtask.rejected', sub, 'SKIPPED', why, 0, '', '', actor)
  redis.call('HSETNX', tk, 'first_failure', 'subtask ' .. sub .. ' was ' .. why)
  redis.call('HINCRBY', tk, 'settled', 1)
  redis.call('HSET', tk, 'updated_at', NOW)
  local since = tonumber(v[2] or '') or tonumber(NOW)
  table.insert(APPROVED, {task, sub, math.max(0, tonumber(NOW) - since)})
  skip_dependents(task, sub, ready)
  settle(task, finished)
end
return cjson.encode({task_status = tstatus, sub_status = found, ready = ready, held = held,
  finished = finished, statuses = statuses_of(finished), ended = ENDED, awaiting = AWAITING,
  approved = APPROVED})
