-- Log an event about a task only while it is in the expected state, so a
-- late planner message can never land after the task's terminal event.
-- PAYLOAD: {task, expected_status, event_type, message}. Returns JSON: 1 if logged, else 0.
local task = PAYLOAD[1]
if redis.call('HGET', k_task(task), 'status') ~= PAYLOAD[2] then
  return cjson.encode(0)
end
emit(task, PAYLOAD[3], '', PAYLOAD[2], PAYLOAD[4], 0, '', PAYLOAD[5])
return cjson.encode(1)
