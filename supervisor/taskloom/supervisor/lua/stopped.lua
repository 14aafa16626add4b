-- A worker acknowledged a Cancel: the handler of each attempt has stopped.
-- Logged for tasks that still exist. PAYLOAD: {StoppedItem, ...}. Returns OkReply.
for _, item in ipairs(PAYLOAD) do
  local task, sub, attempt, worker = unpack(item) -- StoppedItem
  if redis.call('EXISTS', k_task(task)) == 1 then
    local status = redis.call('HGET', k_subtask(task, sub), 'status') or ''
    emit(task, 'subtask.stopped', sub, status,
      'worker ' .. worker .. ' stopped attempt ' .. attempt, attempt, worker)
  end
end
return cjson.encode({ok = 1})
