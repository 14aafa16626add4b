-- Shared by every script; loaded after the key builders from keys.py.
-- ARGV: the key prefix (the key builders read it), now (Unix seconds), the
-- retention (seconds), the script's payload as JSON (its type is named in
-- scripts.py, and on the line of each script that unpacks it), the
-- caller's fencing token and the retention of a task that did not succeed.
local _, NOW, RETENTION_SECONDS, PAYLOAD_JSON, FENCE, SHORT_RETENTION = unpack(ARGV)
local RETENTION = tonumber(RETENTION_SECONDS)
local UNSUCCESSFUL_RETENTION = tonumber(SHORT_RETENTION or RETENTION_SECONDS)
local PAYLOAD = cjson.decode(PAYLOAD_JSON)

-- Fencing: a supervisor writes only while the leader lease holds its token.
-- A former leader that was paused or cut off past its lease gets this error
-- instead of overwriting what the new leader decided. (The leadership script
-- itself passes no token.)
if FENCE ~= '' and redis.call('GET', k_leader()) ~= FENCE then
  return redis.error_reply('TASKLOOM_FENCED the leader lease is held by ' ..
    tostring(redis.call('GET', k_leader()) or 'nobody'))
end

-- What each principal has in Redis, against its budgets: the subtasks of
-- its unfinished tasks and the bytes of what it stored (goals, plans,
-- outputs, streamed text) until they expire. The owner of each task is read
-- once per script.
local OWNERS = {}
local function owner_of(task)
  local owner = OWNERS[task]
  if owner == nil then
    owner = redis.call('HGET', k_task(task), 'owner') or ''
    OWNERS[task] = owner
  end
  return owner
end
local function account(task, subtasks, bytes)
  local owner = owner_of(task)
  if bytes ~= 0 then redis.call('HINCRBY', k_task(task), 'stored', bytes) end
  if owner == '' then return end
  local usage = k_owner_usage(owner)
  if subtasks ~= 0 then redis.call('HINCRBY', usage, 'subtasks', subtasks) end
  if bytes ~= 0 then redis.call('HINCRBY', usage, 'bytes', bytes) end
end
-- The bytes of a plan's rows as stored.
local function rows_size(rows)
  local size = 0
  for _, row in ipairs(rows) do
    size = size + #row[1] + #row[2] + #row[3] + #row[4] + #row[6]
  end
  return size
end

local SUBTASK_TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true, SKIPPED = true}
local TASK_TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true}

-- The status of each task this script has read or set. Within these
-- scripts a task's status changes only in finish_task and store_plan, which
-- keep it up to date, so it is read from Redis once per task and script.
local TASK_STATUS = {}
local function task_status(task)
  local status = TASK_STATUS[task]
  if status == nil then
    status = redis.call('HGET', k_task(task), 'status') or ''
    TASK_STATUS[task] = status
  end
  return status
end

-- What this script has just written and would otherwise read back: the
-- fields of a new task (create.lua fills it), and of each subtask that
-- store_plan made READY, as assign_one reads them (keyed by the subtask's
-- key). A new plan's first subtasks are mostly handed out in the script that
-- stores them. finish_task forgets the subtasks it cancels.
local NEW_TASK, FRESH = {}, {}

-- A task's priority, read once per task and script.
local PRIORITY = {}
local function priority_of(task)
  local priority = PRIORITY[task]
  if priority == nil then
    priority = tonumber(redis.call('HGET', k_task(task), 'priority') or '0')
    PRIORITY[task] = priority
  end
  return priority
end

-- Append one event to the task's log; returns its id (the stream id).
-- Each event names the task's trace, so a watcher can open it. The trace id
-- is read once per task per script: a batch emits many events per task.
-- An event that records what a person did names them (`actor`).
local TRACE_IDS = {}
local function emit(task, etype, sub, status, message, attempt, worker, span, actor)
  local trace = TRACE_IDS[task]
  if trace == nil then
    local new = NEW_TASK[task]
    trace = new and new.trace_id or redis.call('HGET', k_task(task), 'trace_id') or ''
    TRACE_IDS[task] = trace
  end
  if actor ~= nil and actor ~= '' then
    return redis.call('XADD', k_events(task), '*',
      'type', etype, 'subtask', sub or '', 'status', status or '',
      'message', message or '', 'attempt', tostring(attempt or 0), 'worker', worker or '',
      'trace', trace, 'span', span or '', 'actor', actor)
  end
  return redis.call('XADD', k_events(task), '*',
    'type', etype, 'subtask', sub or '', 'status', status or '',
    'message', message or '', 'attempt', tostring(attempt or 0), 'worker', worker or '',
    'trace', trace, 'span', span or '')
end

-- What began to wait for a person in this script ({task, sub}; sub '' for
-- a plan), and what a person approved or rejected ({task, sub, seconds it
-- waited}): replies carry both, for the supervisor's gauges.
local AWAITING, APPROVED = {}, {}

-- A subtask whose dependencies have all settled: READY, or AWAITING_APPROVAL
-- if a person must let it run first (gated and not yet approved). READY ones
-- are added to `ready` as {task, sub, capability, priority}.
local function make_ready(task, sub, capability, priority, ready, message, gated)
  local sk = k_subtask(task, sub)
  if gated then
    redis.call('HSET', sk, 'status', 'AWAITING_APPROVAL', 'ready_at', NOW)
    emit(task, 'subtask.awaiting_approval', sub, 'AWAITING_APPROVAL',
      'its inputs are ready; it runs once a person approves it')
    table.insert(AWAITING, {task, sub})
  else
    redis.call('HSET', sk, 'status', 'READY', 'ready_at', NOW)
    emit(task, 'subtask.ready', sub, 'READY', message or '', 0, '')
    table.insert(ready, {task, sub, capability, priority})
  end
end

-- Whether a subtask waits for a person: gated ('1') and not approved.
local function gated_now(gated, approved)
  return gated == '1' and approved ~= '1'
end

-- The terminal event of each task a script ended: {task = {id, type,
-- status, message, trace}}. Replies carry it (as `ended`), so whoever waits
-- for the end is told without reading the log.
local ENDED = {}

-- End a task: set its state, cancel every subtask that has not ended, log it,
-- move it from the active to the finished index and start its retention
-- clock. Returns the attempts that were held by workers, so the caller can
-- tell those workers to stop: {{task, sub, attempt}, ...}.
-- A hash as a table of its fields.
local function hash_of(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do
    out[flat[i]] = flat[i + 1]
  end
  return out
end

-- A task that ends with at most this many subtasks is sent with its terminal
-- event as it is then (`ended[task][6]`: {task = {...}, subtasks = {{...}}}),
-- so that whoever waits for it needs no read.
local INLINE_SNAPSHOT = 8

-- A task that ends with more subtasks than this does not give each of their
-- hashes an expiry (a command each, in the script that ends it): it is
-- compacted at once instead, which deletes them (compact.lua).
local EXPIRE_EACH = 1000

local function finish_task(task, status, err, etype, message, reason, actor)
  local tk = k_task(task)
  -- What failed or was cancelled is kept for a shorter time.
  local retention = RETENTION
  if status ~= 'SUCCEEDED' then retention = UNSUCCESSFUL_RETENTION end
  TASK_STATUS[task] = status
  redis.call('HSET', tk, 'status', status, 'error', err, 'finished_at', NOW, 'updated_at', NOW,
    'failure_reason', reason or '')
  redis.call('ZREM', k_deadlines(), task)
  local subs = redis.call('LRANGE', k_subtasks(task), 0, -1)
  local expiring = #subs <= EXPIRE_EACH
  local held = {}
  for _, sub in ipairs(subs) do
    local sk = k_subtask(task, sub)
    FRESH[sk] = nil
    if status ~= 'SUCCEEDED' then
      local st = redis.call('HMGET', sk, 'status', 'attempt', 'worker')
      if not SUBTASK_TERMINAL[st[1]] then
        redis.call('HSET', sk, 'status', 'CANCELLED', 'finished_at', NOW, 'progress', '',
          'ended_with_task', '1')
        emit(task, 'subtask.cancelled', sub, 'CANCELLED', message, st[2], st[3])
        if st[1] == 'ASSIGNED' or st[1] == 'RUNNING' then
          table.insert(held, {task, sub, tonumber(st[2])})
        end
      end
    end
    if expiring then redis.call('EXPIRE', sk, retention) end
  end
  ENDED[task] = {emit(task, etype, '', status, message, 0, '', '', actor), etype, status, message,
    TRACE_IDS[task]}
  redis.call('ZREM', k_active_index(), task)
  local owner = owner_of(task)
  local counted = redis.call('HMGET', tk, 'total', 'stored')
  if owner ~= '' then
    redis.call('ZREM', k_owner_active(owner), task)
    -- Its subtasks no longer count as unfinished; its bytes count until the
    -- janitor sees it expire (the sizes hash tells it how many, and whose).
    local total = tonumber(counted[1] or '0') or 0
    if total > 0 then redis.call('HINCRBY', k_owner_usage(owner), 'subtasks', -total) end
    redis.call('HSET', k_sizes(), task, (counted[2] or '0') .. ' ' .. owner)
  end
  -- Scored so that the janitor drops it from the indexes when its keys expire.
  redis.call('ZADD', k_finished_index(), tonumber(NOW) - RETENTION + retention, task)
  redis.call('EXPIRE', tk, retention)
  redis.call('EXPIRE', k_subtasks(task), retention)
  redis.call('EXPIRE', k_events(task), retention)
  -- The supervisor compacts it a while later (compact.lua); a large one at once.
  redis.call('ZADD', k_compact(), expiring and NOW or 0, task)
  if #subs <= INLINE_SNAPSHOT then
    local snapshot = {task = hash_of(tk), subtasks = {}}
    for i, sub in ipairs(subs) do
      snapshot.subtasks[i] = hash_of(k_subtask(task, sub))
    end
    ENDED[task][6] = snapshot
  end
  return held
end

-- Add the LLM usage of an attempt or a planning call to the task's totals.
local function add_usage(task, usage_json)
  if usage_json == nil or usage_json == '' then return end
  local u = cjson.decode(usage_json)
  local tk = k_task(task)
  redis.call('HINCRBY', tk, 'in_tokens', math.floor(tonumber(u.input_tokens or 0)))
  redis.call('HINCRBY', tk, 'out_tokens', math.floor(tonumber(u.output_tokens or 0)))
  redis.call('HINCRBY', tk, 'llm_calls', math.floor(tonumber(u.calls or 0)))
  redis.call('HINCRBYFLOAT', tk, 'llm_seconds', tonumber(u.seconds or 0))
  if u.model ~= nil and u.model ~= '' then
    local models = redis.call('HGET', tk, 'models') or ''
    for m in string.gmatch(u.model, '[^,]+') do
      if not string.find(',' .. models .. ',', ',' .. m .. ',', 1, true) then
        if models == '' then models = m else models = models .. ',' .. m end
      end
    end
    redis.call('HSET', tk, 'models', models)
  end
  -- Money by model: a JSON map, and its sum as a number the budget reads.
  if type(u.costs) == 'table' and next(u.costs) ~= nil then
    local costs = cjson.decode(redis.call('HGET', tk, 'costs') or '{}')
    local added = 0
    for m, c in pairs(u.costs) do
      c = tonumber(c) or 0
      if c > 0 then
        costs[m] = (tonumber(costs[m]) or 0) + c
        added = added + c
      end
    end
    if added > 0 then
      redis.call('HSET', tk, 'costs', cjson.encode(costs))
      redis.call('HINCRBYFLOAT', tk, 'cost', added)
    end
  end
end

-- A task that has used more tokens than its max_tokens, or cost more than
-- its max_cost, ends FAILED with BUDGET_EXCEEDED: nothing new starts,
-- running attempts are cancelled. So does one whose worker stopped a
-- subtask, `cut_by`, where the budget ran out (`why`: how). Returns the
-- attempts workers held (to stop), or nil within budget.
local function enforce_budget(task, cut_by, why)
  local tk = k_task(task)
  local v = redis.call('HMGET', tk, 'max_tokens', 'in_tokens', 'out_tokens', 'status',
    'max_cost', 'cost')
  local limit, max_cost = tonumber(v[1] or '0') or 0, tonumber(v[5] or '0') or 0
  if (limit <= 0 and max_cost <= 0) or TASK_TERMINAL[v[4]] then return nil end
  local used = tonumber(v[2] or '0') + tonumber(v[3] or '0')
  local cost = tonumber(v[6] or '0') or 0
  local reason
  if limit > 0 and used > limit then
    reason = 'the task used ' .. used .. ' tokens; its max_tokens is ' .. limit
  elseif max_cost > 0 and cost > max_cost then
    reason = string.format('the task cost %.6g; its max_cost is %.6g', cost, max_cost)
  elseif cut_by ~= nil then
    reason = 'the task\'s budget ran out (' .. used .. ' tokens' ..
      (limit > 0 and (' of its max_tokens ' .. limit) or '') ..
      (max_cost > 0 and string.format(', cost %.6g of its max_cost %.6g', cost, max_cost) or '') ..
      ')'
  else
    return nil
  end
  if cut_by ~= nil then
    reason = reason .. '; in ' .. cut_by .. ', ' ..
      string.gsub(why or 'it stopped', '^BUDGET_EXCEEDED: ', '')
  end
  reason = 'BUDGET_EXCEEDED: ' .. reason
  return finish_task(task, 'FAILED', reason, 'task.failed', reason, 'BUDGET_EXCEEDED')
end

-- Dependents of `sub` whose last dependency it was become READY (added to
-- `ready`). dependents: the subtask's `dependents` field, if already read.
local function unlock_dependents(task, sub, ready, dependents)
  if dependents == nil then
    dependents = redis.call('HGET', k_subtask(task, sub), 'dependents')
  end
  if not dependents or dependents == '[]' then return end
  local priority = priority_of(task)
  for _, dep in ipairs(cjson.decode(dependents)) do
    local dk = k_subtask(task, dep)
    if redis.call('HINCRBY', dk, 'pending', -1) <= 0 then
      local v = redis.call('HMGET', dk, 'status', 'capability', 'gated', 'approved')
      if v[1] == 'PENDING' then
        make_ready(task, dep, v[2], priority, ready, '', gated_now(v[3], v[4]))
      end
    end
  end
end

-- The status each finished task ended with, for the caller's metrics.
local function statuses_of(finished)
  local out = {}
  for i, task in ipairs(finished) do
    out[i] = task_status(task)
  end
  return out
end

-- A result joined from more outputs than this is not written by the script
-- that ends the task (reading them all would hold Redis several microseconds
-- an output): the task's hash says how many (`result_parts`), and readers
-- join them (`records.join_result`).
local RESULT_JOIN_MAX = 1000

-- The task's result: the output of the one subtask it is taken from, or the
-- outputs of several under their titles (nil and their number if too many).
local function task_result(task)
  local from = cjson.decode(redis.call('HGET', k_task(task), 'result_from') or '[]')
  if #from > RESULT_JOIN_MAX then
    return nil, #from
  end
  if #from == 1 then
    return redis.call('HGET', k_subtask(task, from[1]), 'output') or ''
  end
  local parts = {}
  for _, sub in ipairs(from) do
    local v = redis.call('HMGET', k_subtask(task, sub), 'title', 'output')
    local title = v[1]
    if title == nil or title == '' then title = sub end
    table.insert(parts, '## ' .. title .. '\n\n' .. (v[2] or ''))
  end
  return table.concat(parts, '\n\n')
end

-- Whether a report for (sub, attempt) may be committed: the subtask is held
-- by exactly that attempt and its task is still running. Anything else is a
-- stale report (an older attempt, a cancelled task) and is dropped. Returns
-- the subtask's status, and the fields named in `more` (read in the same
-- HMGET) as a list; nil, nil if not held.
local function held_by(task, sub, attempt, worker_id, more)
  local st = redis.call('HMGET', k_subtask(task, sub), 'status', 'attempt', 'worker_id',
    unpack(more or {}))
  if (st[1] ~= 'ASSIGNED' and st[1] ~= 'RUNNING') or tonumber(st[2]) ~= attempt then
    return nil, nil
  end
  -- A report from a worker must come from the worker the attempt was given
  -- to; the supervisor's own verdicts (lease lost, timed out) pass ''.
  if worker_id ~= nil and worker_id ~= '' and st[3] ~= worker_id then
    return nil, nil
  end
  -- While a revised plan waits for approval, attempts already running
  -- still report: nothing new starts, what runs finishes.
  local ts = task_status(task)
  if ts ~= 'RUNNING' and ts ~= 'AWAITING_APPROVAL' then
    return nil, nil
  end
  return st[1], {select(4, unpack(st))}
end

-- The subtasks that depend on `sub`, which will never succeed, cannot run:
-- skip them, and theirs, transitively. A tolerant subtask (the synthesis
-- step) is not skipped: it counts the dependency as settled and runs with
-- what there is once all have. Newly READY subtasks are added to `ready`.
local function skip_dependents(task, sub, ready)
  local tk = k_task(task)
  local priority = priority_of(task)
  local queue, skipped = {sub}, 0
  while #queue > 0 do
    local cur = table.remove(queue)
    for _, dep in ipairs(cjson.decode(redis.call('HGET', k_subtask(task, cur), 'dependents') or '[]')) do
      local dk = k_subtask(task, dep)
      if redis.call('HGET', dk, 'status') == 'PENDING' then
        if redis.call('HGET', dk, 'tolerant') == '1' then
          if redis.call('HINCRBY', dk, 'pending', -1) <= 0 then
            local v = redis.call('HMGET', dk, 'capability', 'gated', 'approved')
            make_ready(task, dep, v[1], priority, ready, 'runs with what its dependencies produced',
              gated_now(v[2], v[3]))
          end
        else
          local why = 'skipped: it depends on ' .. cur .. ', which did not succeed'
          redis.call('HSET', dk, 'status', 'SKIPPED', 'finished_at', NOW, 'error', why)
          emit(task, 'subtask.skipped', dep, 'SKIPPED', why, 0, '')
          skipped = skipped + 1
          table.insert(queue, dep)
        end
      end
    end
  end
  if skipped > 0 then
    redis.call('HINCRBY', tk, 'settled', skipped)
  end
end

-- Once every subtask has ended, end the task: SUCCEEDED if every subtask its
-- result is taken from succeeded, else FAILED with the first failure.
local function settle(task, finished)
  local tk = k_task(task)
  local v = redis.call('HMGET', tk, 'succeeded', 'settled', 'total', 'status')
  local settled = tonumber(v[2] or '0')
  if v[4] ~= 'RUNNING' or tonumber(v[1]) + settled < tonumber(v[3]) then
    return
  end
  local missing = {}
  -- With nothing settled otherwise, every subtask succeeded: no need to look.
  if settled > 0 then
    for _, sub in ipairs(cjson.decode(redis.call('HGET', tk, 'result_from') or '[]')) do
      local v = redis.call('HMGET', k_subtask(task, sub), 'status', 'provided')
      if v[1] ~= 'SUCCEEDED' and v[2] ~= '1' then
        table.insert(missing, sub)
      end
    end
  end
  if #missing == 0 then
    local result, parts = task_result(task)
    if result then
      redis.call('HSET', tk, 'result', result)
    else
      redis.call('HSET', tk, 'result_parts', parts)
    end
    local message = 'all subtasks succeeded'
    if settled > 0 then
      message = settled .. ' subtask(s) failed, were cancelled or skipped; the result covers the rest'
    end
    finish_task(task, 'SUCCEEDED', '', 'task.succeeded', message)
  else
    local reason = redis.call('HGET', tk, 'first_failure') or ''
    reason = 'no result from ' .. table.concat(missing, ', ') .. (reason ~= '' and ('; ' .. reason) or '')
    finish_task(task, 'FAILED', reason, 'task.failed', reason, 'SUBTASK_FAILED')
  end
  table.insert(finished, task)
end

-- Store a plan's subtasks and start the task: each subtask's hash, the list
-- of ids, the task's counters, plan.created and a subtask.ready event for
-- each subtask without dependencies (subtask.awaiting_approval for those a
-- person must let run). One step instead of several commands per subtask: a
-- 20,000-subtask plan is one round trip. With `hold`, the task waits in
-- AWAITING_APPROVAL for a person to approve the plan, and nothing is READY.
-- rows: {SubtaskRow, ...}. Returns the READY ids.
local function ids_json(ids)
  -- cjson writes an empty table as {}; the readers want a JSON list.
  if #ids == 0 then return '[]' end
  return cjson.encode(ids)
end

local function store_plan(task, result_from, rows, hold)
  local dependents = {}
  for _, row in ipairs(rows) do
    local id, _, _, _, deps = unpack(row) -- SubtaskRow
    for _, dep in ipairs(deps) do
      local list = dependents[dep]
      if list == nil then list = {}; dependents[dep] = list end
      table.insert(list, id)
    end
  end

  -- Count the plan against its owner's budgets (one that replaces a plan
  -- counts only the difference in subtasks).
  local before = tonumber(redis.call('HGET', k_task(task), 'total') or '0') or 0
  account(task, #rows - before, rows_size(rows))

  local subs = k_subtasks(task)
  redis.call('DEL', subs)
  local chunk = {}
  for i, row in ipairs(rows) do
    table.insert(chunk, row[1])
    if #chunk == 1000 or i == #rows then
      redis.call('RPUSH', subs, unpack(chunk))
      chunk = {}
    end
  end

  local ready, waiting = {}, {}
  for _, row in ipairs(rows) do
    local id, title, instruction, capability, deps, params, max_attempts, timeout, tolerant,
      gated = unpack(row) -- SubtaskRow
    local status, sk, since = 'PENDING', k_subtask(task, id), ''
    if #deps == 0 and not hold then
      since = NOW
      if gated == 1 then
        status = 'AWAITING_APPROVAL'
        table.insert(waiting, id)
      else
        status = 'READY'
        table.insert(ready, id)
        FRESH[sk] = {status, '0', title, instruction, capability, params, '[]', timeout}
      end
    end
    redis.call('HSET', sk,
      'id', id, 'title', title, 'instruction', instruction, 'capability', capability,
      'deps', ids_json(deps), 'dependents', ids_json(dependents[id] or {}),
      'pending', #deps, 'params', params, 'status', status, 'attempt', 0,
      'max_attempts', max_attempts, 'timeout', timeout, 'tolerant', tolerant, 'gated', gated,
      'ready_at', since, 'created_at', NOW)
  end

  local status = 'RUNNING'
  if hold then status = 'AWAITING_APPROVAL' end
  TASK_STATUS[task] = status
  redis.call('HSET', k_task(task), 'status', status, 'total', #rows, 'succeeded', 0,
    'settled', 0, 'result_from', ids_json(result_from), 'updated_at', NOW,
    'awaiting_since', hold and NOW or '')
  emit(task, 'plan.created', '', status, 'plan with ' .. #rows .. ' subtasks')
  if hold then
    emit(task, 'task.awaiting_approval', '', status,
      'the plan waits for a person to approve it (taskloom approve ' .. task .. ')')
    table.insert(AWAITING, {task, ''})
  end
  for _, sub in ipairs(ready) do
    emit(task, 'subtask.ready', sub, 'READY', '')
  end
  for _, sub in ipairs(waiting) do
    emit(task, 'subtask.awaiting_approval', sub, 'AWAITING_APPROVAL',
      'it runs once a person approves it')
    table.insert(AWAITING, {task, sub})
  end
  return ready
end

-- Make a plan that stage.lua wrote in parts the task's plan: the task's
-- fields, plan.created, and what waits for approval. Its first subtasks are
-- READY already (stage.lua), and are not logged one by one (subtask.ready):
-- that would be as long a step as the one staging avoids. Returns the ids of
-- the READY ones and each one's capability, as store_plan's caller needs.
local function finish_staged(task, result_from, staged, hold)
  local subtasks, size, roots, waiting = unpack(staged) -- StagedPlan
  redis.call('ZREM', k_staging(), task)
  account(task, subtasks, size)
  local status = 'RUNNING'
  if hold then status = 'AWAITING_APPROVAL' end
  TASK_STATUS[task] = status
  redis.call('HSET', k_task(task), 'status', status, 'total', subtasks, 'succeeded', 0,
    'settled', 0, 'result_from', ids_json(result_from), 'updated_at', NOW,
    'awaiting_since', hold and NOW or '')
  emit(task, 'plan.created', '', status, 'plan with ' .. subtasks .. ' subtasks, ' .. #roots ..
    ' of them ready')
  if hold then
    emit(task, 'task.awaiting_approval', '', status,
      'the plan waits for a person to approve it (taskloom approve ' .. task .. ')')
    table.insert(AWAITING, {task, ''})
  end
  for _, sub in ipairs(waiting) do
    emit(task, 'subtask.awaiting_approval', sub, 'AWAITING_APPROVAL',
      'it runs once a person approves it')
    table.insert(AWAITING, {task, sub})
  end
  local ids, capability = {}, {}
  for _, root in ipairs(roots) do
    table.insert(ids, root[1])
    capability[root[1]] = root[2]
  end
  return ids, capability
end

-- Give a READY subtask to a worker: READY -> ASSIGNED with attempt + 1.
-- Written before the Assignment is sent, so a crash in between leaves an
-- ASSIGNED subtask whose lease expires, never a subtask nobody holds.
-- A subtask whose worker can cache its capability (fingerprint ~= '') is
-- looked up first: the SHA-1 of its capability, instruction, params, inputs,
-- the goal, context settings and the fingerprint (handler version and
-- model), which is everything a handler is given. On a hit it SUCCEEDS at
-- once with the stored output, and no worker runs it: its dependents that
-- become READY go into `ready`, its task into `finished` if it ended.
-- Returns {attempt, title, instruction, capability, params, inputs =
-- {{dep, title, output}, ...}, timeout, stall, context_tokens, context,
-- budget_tokens, budget_cost},
-- 'hit', or nil if the subtask is not READY (cancelled, or queued twice)
-- or its task is not running. GOALS and TRACES collect what the
-- assignments of each task share, for the reply.
local GOALS, TRACES, TASK_SHARED = {}, {}, {}
local function assign_one(task, sub, worker_id, worker, fingerprint, ready, finished)
  local tk, sk = k_task(task), k_subtask(task, sub)
  local st = FRESH[sk]
  if st then
    FRESH[sk] = nil
  else
    st = redis.call('HMGET', sk, 'status', 'attempt', 'title', 'instruction',
      'capability', 'params', 'deps', 'timeout')
  end
  -- The task's status is checked each time: a cache hit earlier in this
  -- script may have finished it (finish_task keeps task_status current).
  if st[1] ~= 'READY' or task_status(task) ~= 'RUNNING' then
    return nil
  end
  -- What every subtask of a task shares, read once per task and script:
  -- stall, context tokens, context mode, cache TTL, goal, trace, paused, owner.
  local tv = TASK_SHARED[task]
  if tv == nil then
    local new = NEW_TASK[task]
    if new then
      tv = {new.stall, new.ctx_tokens, new.ctx_mode, new.cache_ttl, new.goal, new.traceparent, '',
        new.owner or '', new.max_tokens, new.max_cost}
    else
      tv = redis.call('HMGET', tk, 'stall', 'ctx_tokens', 'ctx_mode', 'cache_ttl', 'goal',
        'traceparent', 'paused', 'owner', 'max_tokens', 'max_cost')
    end
    -- What the task may still spend (0: no limit), read only if it has a
    -- budget: its attempts are told, and stop their generation there.
    tv[11], tv[12] = 0, 0
    local limit, max_cost = tonumber(tv[9] or '0') or 0, tonumber(tv[10] or '0') or 0
    if limit > 0 or max_cost > 0 then
      local u = redis.call('HMGET', tk, 'in_tokens', 'out_tokens', 'cost')
      if limit > 0 then
        tv[11] = math.max(limit - tonumber(u[1] or '0') - tonumber(u[2] or '0'), 1)
      end
      if max_cost > 0 then tv[12] = math.max(max_cost - tonumber(u[3] or '0'), 1e-9) end
    end
    TASK_SHARED[task] = tv
    GOALS[task] = tv[5] or ''
    TRACES[task] = tv[6] or ''
  end
  -- A paused task starts nothing; its READY subtasks wait for the resume.
  if tv[7] == '1' then
    return nil
  end
  local inputs, outputs = {}, {}
  for _, dep in ipairs(cjson.decode(st[7])) do
    local dv = redis.call('HMGET', k_subtask(task, dep), 'title', 'output', 'status', 'error',
      'provided')
    local output = dv[2] or ''
    if dv[3] ~= 'SUCCEEDED' and dv[5] ~= '1' then
      -- Only a tolerant subtask (the synthesis step) runs after a dependency
      -- that did not succeed; it is told so rather than handed nothing.
      output = '[no output: this step ended ' .. tostring(dv[3]) .. ' (' .. (dv[4] or '') .. ')]'
    end
    table.insert(inputs, {dep, dv[1] or '', output})
    table.insert(outputs, output)
  end
  if fingerprint ~= nil and fingerprint ~= '' and tonumber(tv[4] or '0') > 0 then
    -- An output is reused for its owner's identical subtasks only, unless
    -- the handler declared it shared (a pure function of public inputs).
    local scope = tv[8] or ''
    if string.sub(fingerprint, 1, 7) == 'shared:' then scope = '' end
    local key = redis.sha1hex(cjson.encode({st[5], st[4], st[6] or '{}', outputs,
      GOALS[task], tv[2] or '0', tv[3] or '', fingerprint, scope}))
    local hit = redis.call('GET', k_cache(key))
    if hit then
      redis.call('HSET', sk, 'status', 'SUCCEEDED', 'output', hit, 'usage', '',
        'finished_at', NOW, 'progress', '', 'error', '', 'cache_hit', '1')
      account(task, 0, #hit)
      emit(task, 'subtask.succeeded', sub, 'SUCCEEDED',
        'cache_hit: the output of an identical earlier subtask, reused', 0, '')
      redis.call('HSET', tk, 'updated_at', NOW)
      redis.call('HINCRBY', tk, 'succeeded', 1)
      unlock_dependents(task, sub, ready)
      settle(task, finished)
      return 'hit'
    end
    redis.call('HSET', sk, 'cache_key', key)
  end
  local attempt = tonumber(st[2]) + 1
  redis.call('HSET', sk, 'status', 'ASSIGNED', 'attempt', attempt, 'worker', worker,
    'worker_id', worker_id, 'assigned_at', NOW, 'progress', '')
  emit(task, 'subtask.assigned', sub, 'ASSIGNED', 'assigned to ' .. worker, attempt, worker)
  return {attempt, st[3], st[4], st[5], st[6], inputs, tonumber(st[8] or '0'),
    tonumber(tv[1] or '0'), tonumber(tv[2] or '0'), tv[3] or '', tv[11], tv[12]}
end

-- Hand subtasks that just became READY straight to free worker slots the
-- supervisor offered, in the step that made them READY: no second round
-- trip to assign them. offer: {capability = {OfferedSlot, ...}}, taken
-- round-robin, each slot's last field counting down what it can still take;
-- limits: {task = how many more may run} for tasks with max_parallel. ready:
-- {ReadyRow, ...}. Returns handed = {HandedRow, ...}, the capabilities of
-- cache hits (cached), and the rows still READY (for the supervisor's queue).
local function hand_out(ready, offer, limits, finished)
  if not offer then return {}, {}, ready end
  local handed, hits, left, turn = {}, {}, {}, {}
  local i = 1
  while i <= #ready do
    local item = ready[i]
    i = i + 1
    local task, sub, capability = unpack(item) -- ReadyRow
    local workers = offer[capability]
    local limit = limits[task]
    local w = nil
    if workers ~= nil and (limit == nil or limit > 0) then
      -- The next worker, round-robin, with a slot left.
      local start = turn[capability] or 0
      for k = 1, #workers do
        local j = (start + k - 1) % #workers + 1
        if workers[j][4] > 0 then w = j; break end
      end
    end
    if w == nil then
      table.insert(left, item)
    else
      local slot = workers[w]
      local worker_id, worker, fingerprint = unpack(slot) -- OfferedSlot
      -- A cache hit appends the dependents it unlocks to `ready`: they are
      -- handed out too, further down this loop.
      local a = assign_one(task, sub, worker_id, worker, fingerprint, ready, finished)
      if a == 'hit' then
        table.insert(hits, capability)
      elseif a ~= nil then
        slot[4] = slot[4] - 1
        turn[capability] = w
        if limit ~= nil then limits[task] = limit - 1 end
        table.insert(handed, {task, sub, capability, w, a})
      end
    end
  end
  return handed, hits, left
end

-- ---------------------------------------------------------------------------
-- Steering: what a person's retry or skip changes (rework.lua).

-- The subtasks downstream of `roots` (their dependents, transitively),
-- roots first.
local function downstream(task, roots)
  local seen, order = {}, {}
  for _, root in ipairs(roots) do
    if not seen[root] then seen[root] = true; table.insert(order, root) end
  end
  local i = 1
  while i <= #order do
    local dependents = redis.call('HGET', k_subtask(task, order[i]), 'dependents') or '[]'
    for _, dep in ipairs(cjson.decode(dependents)) do
      if not seen[dep] then seen[dep] = true; table.insert(order, dep) end
    end
    i = i + 1
  end
  return order
end

-- Whether a dependency lets its dependent run: it succeeded, or a person
-- gave its output; a tolerant dependent (the synthesis step) runs after any end.
local function satisfied(status, provided, tolerant)
  if tolerant then return SUBTASK_TERMINAL[status] == true end
  return status == 'SUCCEEDED' or provided == '1'
end

-- Put `subs` back to PENDING so that they run again. Attempt numbers go on,
-- so a report of an old attempt stays stale; attempts still held are added
-- to `held`, to be stopped. Then each that can run now is made READY (or
-- waits for approval again: an approval was for the old inputs), and each
-- that never can (a dependency failed) is skipped with its dependents.
-- `root` is the subtask a person asked to retry: its event (`why`) names
-- them and it keeps its approval; the others say why they run again (`because`).
local function rerun(task, subs, held, ready, actor, why, because, root)
  local priority = priority_of(task)
  for _, sub in ipairs(subs) do
    local sk = k_subtask(task, sub)
    local v = redis.call('HMGET', sk, 'status', 'attempt')
    if v[1] == 'ASSIGNED' or v[1] == 'RUNNING' then
      table.insert(held, {task, sub, tonumber(v[2])})
    end
    FRESH[sk] = nil
    redis.call('HDEL', sk, 'output', 'error', 'progress', 'usage', 'started_at', 'finished_at',
      'cache_hit', 'cache_key', 'failures', 'lost', 'provided', 'ended_with_task', 'ready_at',
      'retry_at')
    if sub == root then
      redis.call('HSET', sk, 'status', 'PENDING', 'approved', '1')
      emit(task, 'subtask.retried', sub, 'PENDING', why, v[2], '', '', actor)
    else
      redis.call('HSET', sk, 'status', 'PENDING')
      redis.call('HDEL', sk, 'approved')
      emit(task, 'subtask.reset', sub, 'PENDING', because, v[2], '')
    end
  end
  for _, sub in ipairs(subs) do
    local sk = k_subtask(task, sub)
    local v = redis.call('HMGET', sk, 'status', 'deps', 'tolerant', 'capability', 'gated',
      'approved')
    -- Still PENDING, unless skipped meanwhile for a failed dependency.
    if v[1] == 'PENDING' then
      local tolerant = v[3] == '1'
      local pending, blocked = 0, nil
      for _, dep in ipairs(cjson.decode(v[2] or '[]')) do
        local d = redis.call('HMGET', k_subtask(task, dep), 'status', 'provided')
        if not satisfied(d[1], d[2], tolerant) then
          if SUBTASK_TERMINAL[d[1]] then
            blocked = blocked or dep
          else
            pending = pending + 1
          end
        end
      end
      redis.call('HSET', sk, 'pending', pending)
      if blocked then
        local skipped = 'skipped: it depends on ' .. blocked .. ', which did not succeed'
        redis.call('HSET', sk, 'status', 'SKIPPED', 'finished_at', NOW, 'error', skipped)
        emit(task, 'subtask.skipped', sub, 'SKIPPED', skipped, 0, '')
        skip_dependents(task, sub, ready)
      elseif pending == 0 then
        make_ready(task, sub, v[4], priority, ready, '', gated_now(v[5], v[6]))
      end
    end
  end
end

-- The task's counters from its subtasks' states (after a rework changed
-- many at once): succeeded, and settled (ended without succeeding; a
-- failed subtask the planner is replacing counts once replaced).
local function recount(task)
  local tk = k_task(task)
  local replacing = redis.call('HGET', tk, 'replan_pending') or ''
  local succeeded, settled = 0, 0
  for _, sub in ipairs(redis.call('LRANGE', k_subtasks(task), 0, -1)) do
    local status = redis.call('HGET', k_subtask(task, sub), 'status')
    if status == 'SUCCEEDED' then
      succeeded = succeeded + 1
    elseif SUBTASK_TERMINAL[status] and sub ~= replacing then
      settled = settled + 1
    end
  end
  redis.call('HSET', tk, 'succeeded', succeeded, 'settled', settled)
end

-- A task that ended runs again: RUNNING, back in the active indexes, its
-- keys kept beyond the retention, its deadline back if it has not passed.
-- Returns the subtasks its end cancelled: they run again too.
local function reopen(task, actor, why)
  local tk = k_task(task)
  local v = redis.call('HMGET', tk, 'owner', 'created_at', 'max_duration', 'total')
  if v[1] and v[1] ~= '' then
    local total = tonumber(v[4] or '0') or 0
    if total > 0 then redis.call('HINCRBY', k_owner_usage(v[1]), 'subtasks', total) end
    redis.call('HDEL', k_sizes(), task)
  end
  TASK_STATUS[task] = 'RUNNING'
  redis.call('HSET', tk, 'status', 'RUNNING', 'updated_at', NOW)
  redis.call('HDEL', tk, 'error', 'failure_reason', 'finished_at', 'result', 'result_parts',
    'first_failure', 'failed_by')
  redis.call('PERSIST', tk)
  redis.call('PERSIST', k_subtasks(task))
  redis.call('PERSIST', k_events(task))
  redis.call('ZREM', k_finished_index(), task)
  redis.call('ZREM', k_compact(), task)
  local created = tonumber(v[2] or NOW)
  redis.call('ZADD', k_active_index(), created, task)
  if v[1] and v[1] ~= '' then redis.call('ZADD', k_owner_active(v[1]), created, task) end
  local budget = tonumber(v[3] or '0') or 0
  if budget > 0 and created + budget > tonumber(NOW) then
    redis.call('ZADD', k_deadlines(), created + budget, task)
  end
  emit(task, 'task.reopened', '', 'RUNNING', why, 0, '', '', actor)
  local again = {}
  for _, sub in ipairs(redis.call('LRANGE', k_subtasks(task), 0, -1)) do
    local sk = k_subtask(task, sub)
    redis.call('PERSIST', sk)
    if redis.call('HGET', sk, 'ended_with_task') == '1' then table.insert(again, sub) end
  end
  return again
end

-- "by alice" or "by alice: the reason", for a person's action.
local function by(actor, reason)
  if reason ~= nil and reason ~= '' then return 'by ' .. actor .. ': ' .. reason end
  return 'by ' .. actor
end
