-- Log an event about a task only while it is in the expected state, so a
-- late planner message can never land after the task's terminal event.
-- Returns OkReply (ok = 0: the task was not in that state).
local task, expected, event_type, message, span = unpack(PAYLOAD) -- NoteArgs
if redis.call('HGET', k_task(task), 'status') ~= expected then
  return cjson.encode({ok = 0})
end
emit(task, event_type, '', expected, message, 0, '', span)
return cjson.encode({ok = 1})
