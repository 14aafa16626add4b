-- Cancel one subtask of a running task: it ends CANCELLED, its dependents are
-- skipped, and the task runs on (ending now if that was all that was left).
-- PAYLOAD: {task, sub, reason}
-- Returns JSON: {task = task status or '', sub = subtask status or '',
--   changed = 0|1, held = {{task, sub, attempt}}, ready = {...}, finished = {...}}
local task, sub, reason = PAYLOAD[1], PAYLOAD[2], PAYLOAD[3]
local tk, sk = k_task(task), k_subtask(task, sub)
local tstatus = redis.call('HGET', tk, 'status')
if not tstatus then
  return cjson.encode({task = '', sub = '', changed = 0})
end
local st = redis.call('HMGET', sk, 'status', 'attempt', 'worker')
if not st[1] then
  return cjson.encode({task = tstatus, sub = '', changed = 0})
end
if tstatus ~= 'RUNNING' or SUBTASK_TERMINAL[st[1]] then
  return cjson.encode({task = tstatus, sub = st[1], changed = 0})
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
return cjson.encode({task = tstatus, sub = st[1], changed = 1, held = held, ready = ready,
  statuses = statuses_of(finished), ended = ENDED,
  finished = finished})
