-- End a task from outside its subtasks: cancellation, or a planning failure.
-- Only a task in one of the expected states changes; the caller learns what
-- state it found. Returns FinishReply: the status found and, if it ended
-- the task, what that changed (an OutcomeReply).
local task, status, error, event_type, expected, failure_reason = unpack(PAYLOAD) -- FinishArgs
local found = redis.call('HGET', k_task(task), 'status')
if found == false or found == nil then
  return cjson.encode({status = ''})
end
local allowed = false
for _, s in ipairs(expected) do
  if s == found then allowed = true end
end
if not allowed then
  return cjson.encode({status = found})
end
if failure_reason == 'REPLAN_FAILED' then
  -- The subtask the planner could not replace is what ended the task.
  redis.call('HSET', k_task(task), 'failed_by', redis.call('HGET', k_task(task),
    'replan_pending') or '')
end
local held = finish_task(task, status, error, event_type, error, failure_reason)
return cjson.encode({status = found, held = held, finished = {task}, statuses = {status},
  ended = ENDED})
