-- A worker acknowledged a Cancel: the handler of each attempt has stopped.
-- Logged for tasks that still exist; what the attempt's LLM calls had used
-- counts towards its task, ended or not (the tokens were spent), once, and
-- only from the worker the attempt was given to.
-- PAYLOAD: {StoppedItem, ...}. Returns OkReply.
for _, item in ipairs(PAYLOAD) do
  local task, sub, attempt, worker, usage, worker_id = unpack(item) -- StoppedItem
  -- Not for a task gone or compacted (its log and hashes are in its archive;
  -- its attempts were stopped long before).
  local t = redis.call('HMGET', k_task(task), 'status', 'archived')
  if t[1] and not t[2] then
    local sk = k_subtask(task, sub)
    local v = redis.call('HMGET', sk, 'status', 'attempt', 'worker_id', 'charged', 'usage')
    if usage ~= '' and tonumber(v[2]) == attempt and v[3] == worker_id
        and tonumber(v[4] or '0') ~= attempt then
      redis.call('HSET', sk, 'charged', attempt)
      if (v[5] or '') == '' then redis.call('HSET', sk, 'usage', usage) end
      add_usage(task, usage)
    end
    emit(task, 'subtask.stopped', sub, v[1] or '',
      'worker ' .. worker .. ' stopped attempt ' .. attempt, attempt, worker)
  end
end
return cjson.encode({ok = 1})
