-- A worker accepted assignments: ASSIGNED -> RUNNING.
-- PAYLOAD: {StartItem, ...}. Returns CommittedReply (0: stale).
local committed = {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt, worker_id = unpack(item) -- StartItem
  local status = held_by(task, sub, attempt, worker_id)
  committed[i] = 0
  if status == 'ASSIGNED' then
    local sk = k_subtask(task, sub)
    redis.call('HSET', sk, 'status', 'RUNNING', 'started_at', NOW)
    emit(task, 'subtask.running', sub, 'RUNNING', '', attempt, redis.call('HGET', sk, 'worker'))
    committed[i] = 1
  elseif status == 'RUNNING' then
    committed[i] = 1
  end
end
return cjson.encode({committed = committed})
