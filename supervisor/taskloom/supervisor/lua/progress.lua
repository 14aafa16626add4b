-- Progress from a running handler, logged only for the attempt that holds
-- the subtask. PAYLOAD: {{task, sub, attempt, message}, ...}.
-- Returns JSON: {1|0, ...} (0: stale).
local out = {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt, message = item[1], item[2], item[3], item[4]
  out[i] = 0
  local status = held_by(task, sub, attempt)
  if status then
    local sk = k_subtask(task, sub)
    redis.call('HSET', sk, 'progress', message)
    emit(task, 'subtask.progress', sub, status, message, attempt, redis.call('HGET', sk, 'worker'))
    out[i] = 1
  end
end
return cjson.encode(out)
