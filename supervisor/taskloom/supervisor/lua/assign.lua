-- Assign READY subtasks to workers: READY -> ASSIGNED with attempt + 1.
-- Written before the Assignment is sent, so a crash in between leaves an
-- ASSIGNED subtask whose lease expires, never a subtask nobody holds.
-- A subtask whose worker can cache its capability (fingerprint ~= '') is
-- looked up first: the SHA-1 of its capability, instruction, params, inputs,
-- the goal, context settings and the fingerprint (handler version and
-- model), which is everything a handler is given. On a hit
-- it SUCCEEDS at once with the stored output, and no worker runs it.
-- PAYLOAD: {{task, sub, worker_id, worker_name, fingerprint}, ...}
-- Returns JSON: {assigned = {{index, attempt, title, instruction, capability,
--   params, inputs = {{dep, title, output}, ...}, timeout, stall, context_tokens,
--   context}, ...}, goals = {task = goal}, traces = {task = traceparent},
--   hits = {index, ...}, ready = {...}, finished = {task, ...}, statuses = {...}}
local assigned, goals, traces, hits, ready, finished = {}, {}, {}, {}, {}, {}
-- What every subtask of a task shares, read once per task and batch: stall,
-- context tokens, context mode, cache TTL.
local shared = {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, worker_id, worker, fingerprint = item[1], item[2], item[3], item[4], item[5]
  local tk, sk = k_task(task), k_subtask(task, sub)
  local st = redis.call('HMGET', sk, 'status', 'attempt', 'title', 'instruction',
    'capability', 'params', 'deps', 'timeout')
  if shared[task] == nil then
    shared[task] = redis.call('HMGET', tk, 'stall', 'ctx_tokens', 'ctx_mode', 'cache_ttl')
    goals[task] = redis.call('HGET', tk, 'goal') or ''
    traces[task] = redis.call('HGET', tk, 'traceparent') or ''
  end
  local tv = shared[task]
  -- A subtask can be queued twice (recovery racing a requeue); only the
  -- first assignment finds it READY. The task's status is read each time: a
  -- cache hit earlier in this batch may have finished it.
  if st[1] == 'READY' and redis.call('HGET', tk, 'status') == 'RUNNING' then
    local inputs, outputs = {}, {}
    for _, dep in ipairs(cjson.decode(st[7])) do
      local dv = redis.call('HMGET', k_subtask(task, dep), 'title', 'output', 'status', 'error')
      local output = dv[2] or ''
      if dv[3] ~= 'SUCCEEDED' then
        -- Only a tolerant subtask (the synthesis step) runs after a dependency
        -- that did not succeed; it is told so rather than handed nothing.
        output = '[no output: this step ended ' .. tostring(dv[3]) .. ' (' .. (dv[4] or '') .. ')]'
      end
      table.insert(inputs, {dep, dv[1] or '', output})
      table.insert(outputs, output)
    end
    local hit = nil
    if fingerprint ~= nil and fingerprint ~= '' and tonumber(tv[4] or '0') > 0 then
      local key = redis.sha1hex(cjson.encode({st[5], st[4], st[6] or '{}', outputs,
        goals[task], tv[2] or '0', tv[3] or '', fingerprint}))
      hit = redis.call('GET', k_cache(key))
      if not hit then
        redis.call('HSET', sk, 'cache_key', key)
      end
    end
    if hit then
      redis.call('HSET', sk, 'status', 'SUCCEEDED', 'output', hit, 'usage', '',
        'finished_at', NOW, 'progress', '', 'error', '', 'cache_hit', '1')
      emit(task, 'subtask.succeeded', sub, 'SUCCEEDED',
        'cache_hit: the output of an identical earlier subtask, reused', 0, '')
      redis.call('HSET', tk, 'updated_at', NOW)
      redis.call('HINCRBY', tk, 'succeeded', 1)
      table.insert(hits, i)
      unlock_dependents(task, sub, ready)
      settle(task, finished)
    else
      local attempt = tonumber(st[2]) + 1
      redis.call('HSET', sk, 'status', 'ASSIGNED', 'attempt', attempt, 'worker', worker,
        'worker_id', worker_id, 'assigned_at', NOW, 'progress', '')
      emit(task, 'subtask.assigned', sub, 'ASSIGNED', 'assigned to ' .. worker, attempt, worker)
      table.insert(assigned, {i, attempt, st[3], st[4], st[5], st[6], inputs,
        tonumber(st[8] or '0'), tonumber(tv[1] or '0'), tonumber(tv[2] or '0'), tv[3] or ''})
    end
  end
end
return cjson.encode({assigned = assigned, goals = goals, traces = traces, hits = hits,
  ready = ready,
  statuses = statuses_of(finished),
  finished = finished})
