-- Store a new task, and its plan if it comes with one, in one step:
-- idempotency (a key of the same owner that names a live task returns that
-- task instead), the owner's limits (unfinished tasks, unfinished subtasks,
-- stored bytes), the task's hash, its indexes, task.submitted, and with a
-- plan everything store_plan writes. A large plan was written beforehand in
-- chunks (stage.lua), out of sight until this step makes the task visible;
-- its first subtasks are READY already. The plan's first subtasks go
-- straight to the workers offered (hand_out). Returns CreateReply.
local task, idem, owner, max_in_flight, fields, deadline, message, span, plan, offer, limits,
  priority, budget = unpack(PAYLOAD) -- CreateArgs
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', k_task(existing)) == 1 then
    return cjson.encode({task = existing, created = 0, outcome = {}})
  end
end
if owner ~= '' and max_in_flight > 0
    and redis.call('ZCARD', k_owner_active(owner)) >= max_in_flight then
  return cjson.encode({task = '', created = -1, outcome = {}})
end
local max_subtasks, max_bytes, subtasks, size = unpack(budget) -- Budget
if owner ~= '' then
  local used = redis.call('HMGET', k_owner_usage(owner), 'subtasks', 'bytes')
  local has_subtasks, has_bytes = tonumber(used[1] or '0') or 0, tonumber(used[2] or '0') or 0
  if max_subtasks > 0 and has_subtasks + subtasks > max_subtasks then
    return cjson.encode({task = '', created = -2, outcome = {}, in_use = has_subtasks})
  end
  if max_bytes > 0 and has_bytes + size > max_bytes then
    return cjson.encode({task = '', created = -3, outcome = {}, in_use = has_bytes})
  end
end
local score = tonumber(NOW)
redis.call('HSET', k_task(task), unpack(fields))
local new = {}
for i = 1, #fields, 2 do new[fields[i]] = fields[i + 1] end
NEW_TASK[task] = new
OWNERS[task] = owner
if deadline > 0 then redis.call('ZADD', k_deadlines(), deadline, task) end
redis.call('ZADD', k_tasks_index(), score, task)
redis.call('ZADD', k_active_index(), score, task)
if owner ~= '' then
  redis.call('SADD', k_owners(), owner)
  redis.call('ZADD', k_owner_tasks(owner), score, task)
  redis.call('ZADD', k_owner_active(owner), score, task)
end
if idem ~= '' then redis.call('SET', idem, task, 'EX', RETENTION) end
account(task, 0, #(new.goal or ''))
emit(task, 'task.submitted', '', 'PLANNING', message, 0, '', span)
if not plan then return cjson.encode({task = task, created = 1, outcome = {}}) end
local result_from, rows, staged = unpack(plan) -- PlanArgs
local ids, capability, ready, finished = {}, {}, {}, {}
if staged then
  ids, capability = finish_staged(task, result_from, staged, new.approve_plan == '1')
else
  ids = store_plan(task, result_from, rows, new.approve_plan == '1')
  for _, row in ipairs(rows) do capability[row[1]] = row[4] end
end
for _, sub in ipairs(ids) do table.insert(ready, {task, sub, capability[sub], priority}) end
local handed, cached, left = hand_out(ready, offer, limits, finished)
return cjson.encode({task = task, created = 1, outcome = {handed = handed, cached = cached,
  ready = left, finished = finished, statuses = statuses_of(finished), ended = ENDED,
  goals = GOALS, traces = TRACES, awaiting = AWAITING}})
