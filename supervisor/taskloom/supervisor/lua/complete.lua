-- Commit results: the subtask SUCCEEDED, each dependent whose last
-- dependency this was becomes READY, and the task SUCCEEDS with its last
-- subtask -- all in one atomic step, so no crash can leave a dependent
-- waiting for a dependency that already finished.
-- PAYLOAD: {{task, sub, attempt, output, usage_json}, ...}
-- Returns JSON: {committed = {1|0, ...}, ready = {{task, sub, capability,
--   priority}, ...}, finished = {task, ...}}
local committed, ready, finished = {}, {}, {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt, output, usage = item[1], item[2], item[3], item[4], item[5]
  committed[i] = 0
  if held_by(task, sub, attempt) then
    local tk, sk = k_task(task), k_subtask(task, sub)
    redis.call('HSET', sk, 'status', 'SUCCEEDED', 'output', output, 'usage', usage,
      'finished_at', NOW, 'progress', '', 'error', '')
    emit(task, 'subtask.succeeded', sub, 'SUCCEEDED', '', attempt, redis.call('HGET', sk, 'worker'))
    committed[i] = 1
    local priority = tonumber(redis.call('HGET', tk, 'priority') or '0')
    for _, dep in ipairs(cjson.decode(redis.call('HGET', sk, 'dependents') or '[]')) do
      local dk = k_subtask(task, dep)
      local pending = redis.call('HINCRBY', dk, 'pending', -1)
      if pending <= 0 and redis.call('HGET', dk, 'status') == 'PENDING' then
        redis.call('HSET', dk, 'status', 'READY', 'ready_at', NOW)
        emit(task, 'subtask.ready', dep, 'READY', '', 0, '')
        table.insert(ready, {task, dep, redis.call('HGET', dk, 'capability'), priority})
      end
    end
    redis.call('HSET', tk, 'updated_at', NOW)
    redis.call('HINCRBY', tk, 'succeeded', 1)
    settle(task, finished)
  end
end
return cjson.encode({committed = committed, ready = ready, finished = finished})
