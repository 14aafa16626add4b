-- Commit results: the subtask SUCCEEDED, each dependent whose last
-- dependency this was becomes READY, and the task SUCCEEDS with its last
-- subtask -- all in one atomic step, so no crash can leave a dependent
-- waiting for a dependency that already finished. The attempt's LLM usage is
-- added to the task's; past its max_tokens the task fails instead of going
-- on. An output whose subtask is cacheable is kept for identical subtasks.
-- Dependents that become READY go straight to the workers offered, if any.
-- A task's counters are updated, and whether it has ended is checked, once
-- per task and script rather than once per result: each call into Redis
-- from Lua costs several microseconds, and a batch may hold hundreds.
-- Returns OutcomeReply: committed (1|0 per item), the dependents made READY
-- (or handed out), the tasks finished, the attempts held in tasks that ended.
local items, offer, limits = unpack(PAYLOAD) -- CompleteArgs
local committed, ready, finished, held = {}, {}, {}, {}
local tasks, succeeded, stored = {}, {}, {}
for i, item in ipairs(items) do
  local task, sub, attempt, output, usage, worker_id = unpack(item) -- CompleteItem
  committed[i] = 0
  local status, v = held_by(task, sub, attempt, worker_id, {'worker', 'cache_key', 'dependents'})
  if status then
    local sk = k_subtask(task, sub)
    redis.call('HSET', sk, 'status', 'SUCCEEDED', 'output', output, 'usage', usage,
      'finished_at', NOW, 'progress', '', 'error', '')
    emit(task, 'subtask.succeeded', sub, 'SUCCEEDED', '', attempt, v[1])
    committed[i] = 1
    stored[task] = (stored[task] or 0) + #output
    if v[2] then
      local ttl = tonumber(redis.call('HGET', k_task(task), 'cache_ttl') or '0')
      if ttl > 0 then
        redis.call('SET', k_cache(v[2]), output, 'EX', math.floor(ttl))
      end
    end
    if succeeded[task] == nil then
      succeeded[task] = 0
      table.insert(tasks, task)
    end
    succeeded[task] = succeeded[task] + 1
    local over = nil
    if usage ~= '' then
      add_usage(task, usage)
      over = enforce_budget(task)
    end
    if over ~= nil then
      for _, h in ipairs(over) do table.insert(held, h) end
      table.insert(finished, task)
    else
      unlock_dependents(task, sub, ready, v[3])
    end
  end
end
for _, task in ipairs(tasks) do
  local tk = k_task(task)
  account(task, 0, stored[task])
  redis.call('HSET', tk, 'updated_at', NOW)
  redis.call('HINCRBY', tk, 'succeeded', succeeded[task])
  settle(task, finished)
end
local handed, cached
handed, cached, ready = hand_out(ready, offer, limits, finished)
return cjson.encode({committed = committed, ready = ready, finished = finished, held = held,
  statuses = statuses_of(finished), ended = ENDED, handed = handed, cached = cached,
  goals = GOALS, traces = TRACES, awaiting = AWAITING})
