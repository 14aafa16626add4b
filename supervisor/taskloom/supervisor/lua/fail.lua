-- Commit failures, including lost leases, timeouts and stalls. A retryable
-- failure with attempts left puts the subtask back to READY (the next
-- assignment is attempt + 1); otherwise the subtask FAILS, and then by the
-- task's on_failure policy either the task fails too (cancelling the rest)
-- or the subtask's dependents are skipped and the task runs on, or the
-- planner is asked for a replacement (at most max_replans times). A handler
-- that asks for a replan (ctx.replan) gets one whatever the policy, while
-- replans remain; after that its request fails the step by the policy.
-- A failure that does not count (the worker died or shut down) uses up none
-- of the subtask's max_attempts, only one of MAX_LOST, which stops a subtask
-- that kills every worker it lands on from looping for ever.
-- The attempt's LLM usage counts towards the task's max_tokens either way.
-- A retry waits an exponential backoff with jitter, whose end (`retry_at`)
-- is kept with the subtask: a supervisor that restarts resumes the wait
-- where it was, instead of firing every retry at once.
-- Returns OutcomeReply: committed (1|0 per item), the subtasks READY again
-- (with the failures counted and when the retry may start), the tasks
-- finished, the attempts held in tasks that ended, and the subtasks the
-- planner must replace.
local MAX_LOST = 20

-- A critic's attempt sends one of its dependencies back: that step runs
-- again with the critique added to its instruction (and its previous answer
-- shown), and everything downstream of it (the critic's step included) waits
-- for it. The critic's step is marked `reviewed` in its params (REVIEWED_PARAM
-- in model.py), so that its
-- next attempt merges instead of sending back again: one round. False (and
-- nothing changed) unless `back` is a SUCCEEDED dependency of `sub` and the
-- step was not reviewed yet; the report is then committed as a failure.
local function sent_back(task, sub, attempt, back, critique, ready, held)
  local sk, bk = k_subtask(task, sub), k_subtask(task, back)
  local s = redis.call('HMGET', sk, 'deps', 'params')
  local params = cjson.decode(s[2] or '{}')
  if params.reviewed == '1' then return false end
  local is_dep = false
  for _, dep in ipairs(cjson.decode(s[1] or '[]')) do
    if dep == back then is_dep = true end
  end
  local b = redis.call('HMGET', bk, 'status', 'instruction', 'output')
  if not is_dep or b[1] ~= 'SUCCEEDED' then return false end
  params.reviewed = '1'
  redis.call('HSET', sk, 'params', cjson.encode(params), 'status', 'PENDING')
  redis.call('HSET', bk, 'instruction', (b[2] or '') ..
    '\n\nA reviewer sent your previous answer back. Their critique:\n' .. critique ..
    '\n\nYour previous answer:\n' .. string.sub(b[3] or '', 1, 4000))
  local because = 'sent back by ' .. sub .. ' (attempt ' .. attempt .. '): ' .. critique
  rerun(task, downstream(task, {back}), held, ready, '', because,
    'runs again: ' .. back .. ' was sent back by ' .. sub, back)
  redis.call('HSET', k_task(task), 'updated_at', NOW)
  recount(task)
  return true
end
local items, backoff, backoff_max = unpack(PAYLOAD) -- FailArgs
local committed, ready, finished, held, replan = {}, {}, {}, {}, {}
for i, item in ipairs(items) do
  local task, sub, attempt, error, retryable, counts, usage, worker_id, jitter,
    wants_replan, send_back, budget_exceeded = unpack(item) -- FailItem
  local lost_only = counts == 0
  committed[i] = 0
  local over = nil
  if held_by(task, sub, attempt, worker_id) then
    add_usage(task, usage)
    over = enforce_budget(task, budget_exceeded == 1 and sub or nil, error)
  end
  if over ~= nil then
    committed[i] = 1
    for _, h in ipairs(over) do table.insert(held, h) end
    table.insert(finished, task)
  elseif send_back ~= nil and send_back ~= '' and held_by(task, sub, attempt, worker_id)
      and sent_back(task, sub, attempt, send_back, error, ready, held) then
    committed[i] = 1
  elseif held_by(task, sub, attempt, worker_id) then
    local tk, sk = k_task(task), k_subtask(task, sub)
    local v = redis.call('HMGET', sk, 'max_attempts', 'capability', 'title', 'worker')
    local max_attempts = tonumber(v[1])
    local failures = tonumber(redis.call('HGET', sk, 'failures') or '0')
    local lost = tonumber(redis.call('HGET', sk, 'lost') or '0')
    if not lost_only then
      failures = redis.call('HINCRBY', sk, 'failures', 1)
    else
      lost = redis.call('HINCRBY', sk, 'lost', 1)
    end
    committed[i] = 1
    redis.call('HSET', tk, 'updated_at', NOW)
    local priority = tonumber(redis.call('HGET', tk, 'priority') or '0')
    if wants_replan == 1 then
      retryable = 0 -- the handler wants the step replanned, not run again
    end
    if retryable == 1 and failures < max_attempts and lost < MAX_LOST then
      redis.call('HSET', sk, 'status', 'READY', 'error', error, 'ready_at', NOW, 'progress', '')
      local message
      if lost_only then
        message = 'attempt ' .. attempt .. ' lost: ' .. error ..
          '; running it again (this does not use up one of its ' .. max_attempts .. ' attempts)'
        redis.call('HDEL', sk, 'retry_at')
        table.insert(ready, {task, sub, v[2], priority, 0, 0})
      else
        if failures == attempt then
          message = 'attempt ' .. attempt .. ' of ' .. max_attempts .. ' failed: ' .. error
        else
          message = 'attempt ' .. attempt .. ' failed (' .. failures .. ' of ' .. max_attempts ..
            ' failures allowed): ' .. error
        end
        local wait = math.min(backoff * 2 ^ (failures - 1), backoff_max) * jitter
        local retry_at = tonumber(NOW) + wait
        redis.call('HSET', sk, 'retry_at', string.format('%.6f', retry_at))
        table.insert(ready, {task, sub, v[2], priority, failures, retry_at})
      end
      emit(task, 'subtask.retrying', sub, 'READY', message, attempt, v[4])
    else
      redis.call('HSET', sk, 'status', 'FAILED', 'error', error, 'finished_at', NOW, 'progress', '')
      local why = 'failed after ' .. failures .. ' attempt(s): ' .. error
      if wants_replan == 1 then
        why = 'asked to be planned again: ' .. error
      elseif retryable ~= 1 then
        why = 'failed: ' .. error
      elseif lost >= MAX_LOST then
        why = 'lost its worker ' .. lost .. ' times (' .. error .. '); it may be what stops them'
      end
      emit(task, 'subtask.failed', sub, 'FAILED', why, attempt, v[4])
      local title = v[3]
      if title == nil or title == '' then title = sub end
      local reason = 'subtask ' .. sub .. ' (' .. title .. ') ' .. why
      local policy = redis.call('HGET', tk, 'on_failure')
      local replans = tonumber(redis.call('HGET', tk, 'replans') or '0')
      local max_replans = tonumber(redis.call('HGET', tk, 'max_replans') or '0')
      if (policy == 'replan' or wants_replan == 1) and replans < max_replans
          and redis.call('HGET', sk, 'tolerant') ~= '1' then
        -- The task waits (its dependents stay PENDING) while the planner
        -- replaces this step; recovery finds the mark and asks again.
        redis.call('HSETNX', tk, 'first_failure', reason)
        redis.call('HSET', tk, 'replan_pending', sub)
        table.insert(replan, {task, sub})
      elseif policy == 'skip' then
        redis.call('HSETNX', tk, 'first_failure', reason)
        redis.call('HINCRBY', tk, 'settled', 1)
        skip_dependents(task, sub, ready)
        settle(task, finished)
      else
        redis.call('HSET', tk, 'failed_by', sub)
        for _, h in ipairs(finish_task(task, 'FAILED', reason, 'task.failed', reason,
            'SUBTASK_FAILED')) do
          table.insert(held, h)
        end
        table.insert(finished, task)
      end
    end
  end
end
return cjson.encode({committed = committed, ready = ready, finished = finished, held = held,
  statuses = statuses_of(finished), ended = ENDED,
  replan = replan, awaiting = AWAITING})
