-- End a task from outside its subtasks: cancellation, or a planning failure.
-- PAYLOAD: {task, status, error, event_type, expected = {status, ...}, failure_reason}
-- Only a task in one of the expected states changes; the caller learns what
-- state it found. Returns JSON: {changed = 0|1, status = found, held = {...}}
local task = PAYLOAD[1]
local status = redis.call('HGET', k_task(task), 'status')
if status == false or status == nil then
  return cjson.encode({changed = 0, status = ''})
end
local allowed = false
for _, s in ipairs(PAYLOAD[5]) do
  if s == status then allowed = true end
end
if not allowed then
  return cjson.encode({changed = 0, status = status})
end
local held = finish_task(task, PAYLOAD[2], PAYLOAD[3], PAYLOAD[4], PAYLOAD[3], PAYLOAD[6])
return cjson.encode({changed = 1, status = status, held = held})
