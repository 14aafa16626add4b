-- Commit failures, including lost leases. A retryable failure with attempts
-- left puts the subtask back to READY (the next assignment is attempt + 1);
-- otherwise the subtask FAILS and so does its task, which cancels the rest.
-- PAYLOAD: {{task, sub, attempt, error, retryable (0|1)}, ...}
-- Returns JSON: {committed = {1|0, ...}, ready = {{task, sub, capability,
--   priority, attempt}, ...}, finished = {task, ...}, held = {{task, sub, attempt}, ...}}
local committed, ready, finished, held = {}, {}, {}, {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt, err, retryable = item[1], item[2], item[3], item[4], item[5]
  committed[i] = 0
  if held_by(task, sub, attempt) then
    local tk, sk = k_task(task), k_subtask(task, sub)
    local v = redis.call('HMGET', sk, 'max_attempts', 'capability', 'title', 'worker')
    local max_attempts = tonumber(v[1])
    committed[i] = 1
    redis.call('HSET', tk, 'updated_at', NOW)
    if retryable == 1 and attempt < max_attempts then
      redis.call('HSET', sk, 'status', 'READY', 'error', err, 'ready_at', NOW, 'progress', '')
      emit(task, 'subtask.retrying', sub, 'READY',
        'attempt ' .. attempt .. ' of ' .. max_attempts .. ' failed: ' .. err, attempt, v[4])
      table.insert(ready, {task, sub, v[2], tonumber(redis.call('HGET', tk, 'priority') or '0'), attempt})
    else
      redis.call('HSET', sk, 'status', 'FAILED', 'error', err, 'finished_at', NOW, 'progress', '')
      local why = 'failed after ' .. attempt .. ' attempt(s): ' .. err
      if retryable ~= 1 then why = 'failed: ' .. err end
      emit(task, 'subtask.failed', sub, 'FAILED', why, attempt, v[4])
      local title = v[3]
      if title == nil or title == '' then title = sub end
      local reason = 'subtask ' .. sub .. ' (' .. title .. ') ' .. why
      for _, h in ipairs(finish_task(task, 'FAILED', reason, 'task.failed', reason)) do
        table.insert(held, h)
      end
      table.insert(finished, task)
    end
  end
end
return cjson.encode({committed = committed, ready = ready, finished = finished, held = held})
