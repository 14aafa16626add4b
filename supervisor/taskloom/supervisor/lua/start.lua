-- A worker accepted assignments: ASSIGNED -> RUNNING.
-- PAYLOAD: {{task, sub, attempt, worker_id}, ...}. Returns JSON: {1|0, ...} (0: stale).
local out = {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt = item[1], item[2], item[3]
  local status = held_by(task, sub, attempt, item[4])
  out[i] = 0
  if status == 'ASSIGNED' then
    local sk = k_subtask(task, sub)
    redis.call('HSET', sk, 'status', 'RUNNING', 'started_at', NOW)
    emit(task, 'subtask.running', sub, 'RUNNING', '', attempt, redis.call('HGET', sk, 'worker'))
    out[i] = 1
  elseif status == 'RUNNING' then
    out[i] = 1
  end
end
return cjson.encode(out)
