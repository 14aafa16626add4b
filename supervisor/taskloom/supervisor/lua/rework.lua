-- A person has a subtask run again (retry: a FAILED, SKIPPED or CANCELLED
-- one, with a new instruction if given) or skips it with an output its
-- dependents run on (skip: a pending, waiting or failed one). Everything
-- downstream of it runs again. A task that had ended (FAILED, CANCELLED)
-- runs again too, with the subtasks its end cancelled; if a subtask's
-- failure ended it, that is the one to retry or skip.
-- Returns ControlReply.
local op, task, sub, actor, reason, text = unpack(PAYLOAD) -- ReworkArgs
local tk = k_task(task)
local t = redis.call('HMGET', tk, 'status', 'failed_by', 'failure_reason', 'archived')
local tstatus = t[1]
if not tstatus then
  return cjson.encode({task_status = ''})
end
if t[4] then
  -- Compacted: the supervisor restores it (restore.lua) and asks again.
  return cjson.encode({task_status = tstatus, archived = 1})
end
local sk = k_subtask(task, sub)
local s = redis.call('HMGET', sk, 'status', 'deps', 'tolerant')
local status = s[1]
if not status then
  return cjson.encode({task_status = tstatus, sub_status = '',
    refused = 'task ' .. task .. ' has no subtask ' .. sub})
end
local function refuse(message)
  return cjson.encode({task_status = tstatus, sub_status = status, conflict = 1,
    refused = message})
end
if tstatus == 'PLANNING' or tstatus == 'AWAITING_APPROVAL' then
  return refuse('task ' .. task .. ' is ' .. tstatus ..
    '; a subtask can be reworked once its plan runs')
end
if tstatus == 'SUCCEEDED' then
  return refuse('task ' .. task .. ' already SUCCEEDED; submit it again to run it again')
end
if t[3] == 'BUDGET_EXCEEDED' then
  return refuse('task ' .. task .. ' used up its budget; submit it again with a larger one')
end
local ended = TASK_TERMINAL[tstatus]
if ended and t[2] and t[2] ~= '' and t[2] ~= sub then
  return refuse('task ' .. task .. ' failed because subtask ' .. t[2] .. ' failed: retry or ' ..
    'skip ' .. t[2] .. ' (what depends on it runs again with it)')
end
if op == 'retry' then
  if status ~= 'FAILED' and status ~= 'SKIPPED' and status ~= 'CANCELLED' then
    return refuse('subtask ' .. sub .. ' is ' .. status ..
      '; only a FAILED, SKIPPED or CANCELLED subtask can be retried')
  end
  -- What it needs must be there, or be made again by this retry.
  for _, dep in ipairs(cjson.decode(s[2] or '[]')) do
    local d = redis.call('HMGET', k_subtask(task, dep), 'status', 'provided', 'ended_with_task')
    local comes_back = ended and d[3] == '1'
    if SUBTASK_TERMINAL[d[1]] and not satisfied(d[1], d[2], s[3] == '1')
        and not comes_back then
      return refuse('subtask ' .. sub .. ' needs ' .. dep .. ', which ended ' .. d[1] ..
        ': retry ' .. dep .. ' (' .. sub .. ' runs again with it) or skip it with an output')
    end
  end
elseif status == 'ASSIGNED' or status == 'RUNNING' then
  return refuse('subtask ' .. sub .. ' is ' .. status .. '; cancel it first, then skip it')
elseif status == 'SUCCEEDED' then
  return refuse('subtask ' .. sub .. ' already SUCCEEDED; retry it to run it again')
end
local held, ready, finished = {}, {}, {}
local roots = {sub}
local what = (op == 'retry' and 'retried ' or 'skipped with an output ') .. by(actor, reason)
if ended then
  for _, again in ipairs(reopen(task, actor, 'reopened: subtask ' .. sub .. ' ' .. what)) do
    table.insert(roots, again)
  end
end
if op == 'retry' then
  if text then redis.call('HSET', sk, 'instruction', text) end
  rerun(task, downstream(task, roots), held, ready, actor, what,
    'runs again: ' .. sub .. ' was ' .. what, sub)
else
  redis.call('HSET', sk, 'status', 'SKIPPED', 'output', text or '', 'provided', '1',
    'finished_at', NOW, 'progress', '')
  redis.call('HDEL', sk, 'error', 'ended_with_task')
  emit(task, 'subtask.provided', sub, 'SKIPPED', what, 0, '', '', actor)
  local rest = {}
  for _, other in ipairs(downstream(task, roots)) do
    if other ~= sub then table.insert(rest, other) end
  end
  rerun(task, rest, held, ready, actor, what, 'runs again on the output ' .. sub .. ' was given',
    sub)
end
redis.call('HSET', tk, 'updated_at', NOW)
recount(task)
settle(task, finished)
return cjson.encode({task_status = tstatus, sub_status = status, held = held, ready = ready,
  finished = finished, statuses = statuses_of(finished), ended = ENDED, awaiting = AWAITING,
  approved = APPROVED, reopened = ended and {task} or {}})
