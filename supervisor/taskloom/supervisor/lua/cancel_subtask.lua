-- Cancel one subtask of a running task: it ends CANCELLED, its dependents are
-- skipped, and the task runs on (ending now if that was all that was left).
-- Returns CancelSubtaskReply: the task's and the subtask's status as found,
-- whether anything changed, and what did (an OutcomeReply).
local task, sub, reason = unpack(PAYLOAD) -- CancelSubtaskArgs
local tk, sk = k_task(task), k_subtask(task, sub)
local tstatus = redis.call('HGET', tk, 'status')
if not tstatus then
  return cjson.encode({task_status = '', sub_status = '', changed = 0})
end
local st = redis.call('HMGET', sk, 'status', 'attempt', 'worker')
if not st[1] then
  return cjson.encode({task_status = tstatus, sub_status = '', changed = 0})
end
if tstatus ~= 'RUNNING' or SUBTASK_TERMINAL[st[1]] then
  return cjson.encode({task_status = tstatus, sub_status = st[1], changed = 0})
end
local held, ready, finished = {}, {}, {}
redis.call('HSET', sk, 'status', 'CANCELLED', 'finished_at', NOW, 'progress', '', 'error', reason)
emit(task, 'subtask.cancelled', sub, 'CANCELLED', reason, st[2], st[3])
if st[1] == 'ASSIGNED' or st[1] == 'RUNNING' then
  table.insert(held, {task, sub, tonumber(st[2])})
end
redis.call('HSETNX', tk, 'first_failure', 'subtask ' .. sub .. ' was cancelled: ' .. reason)
redis.call('HINCRBY', tk, 'settled', 1)
redis.call('HSET', tk, 'updated_at', NOW)
skip_dependents(task, sub, ready)
settle(task, finished)
return cjson.encode({task_status = tstatus, sub_status = st[1], changed = 1, held = held,
  ready = ready,
  statuses = statuses_of(finished), ended = ENDED,
  finished = finished, awaiting = AWAITING})
