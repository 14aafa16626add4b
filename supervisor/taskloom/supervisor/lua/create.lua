-- Store a new task, and its plan if it comes with one, in one step:
-- idempotency (a key of the same owner that names a live task returns that
-- task instead), the owner's limit on unfinished tasks, the task's hash, its
-- indexes, task.submitted, and with a plan everything store_plan writes.
-- PAYLOAD: {task, idem_key ('' for none), owner, max_in_flight (0: none),
--   fields (flat HSET list), deadline (0: none), message, span,
--   plan ({result_from, subtasks} or false), offer (or false), limits,
--   priority}
--   offer and limits: see hand_out in lib.lua.
-- Returns JSON: {task id, created (1), {handed, cached, ready, finished,
--   statuses, ended, goals, traces}} (hand_out's, for the plan's first
--   subtasks), or {existing id, 0, {}}, or {'', -1, {}} when the owner is
--   at the limit.
local task, idem, owner, limit = PAYLOAD[1], PAYLOAD[2], PAYLOAD[3], PAYLOAD[4]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', k_task(existing)) == 1 then
    return cjson.encode({existing, 0, {}})
  end
end
if owner ~= '' and limit > 0 and redis.call('ZCARD', k_owner_active(owner)) >= limit then
  return cjson.encode({'', -1, {}})
end
local score = tonumber(NOW)
redis.call('HSET', k_task(task), unpack(PAYLOAD[5]))
local new = {}
for i = 1, #PAYLOAD[5], 2 do new[PAYLOAD[5][i]] = PAYLOAD[5][i + 1] end
NEW_TASK[task] = new
if PAYLOAD[6] > 0 then redis.call('ZADD', k_deadlines(), PAYLOAD[6], task) end
redis.call('ZADD', k_tasks_index(), score, task)
redis.call('ZADD', k_active_index(), score, task)
if owner ~= '' then
  redis.call('SADD', k_owners(), owner)
  redis.call('ZADD', k_owner_tasks(owner), score, task)
  redis.call('ZADD', k_owner_active(owner), score, task)
end
if idem ~= '' then redis.call('SET', idem, task, 'EX', RETENTION) end
emit(task, 'task.submitted', '', 'PLANNING', PAYLOAD[7], 0, '', PAYLOAD[8])
if not PAYLOAD[9] then return cjson.encode({task, 1, {}}) end
local subtasks = PAYLOAD[9][2]
local ids = store_plan(task, PAYLOAD[9][1], subtasks)
-- The plan's first subtasks go straight to the workers offered, if any.
local capability, ready, finished = {}, {}, {}
for _, s in ipairs(subtasks) do capability[s[1]] = s[4] end
local priority = tonumber(PAYLOAD[12])
for _, sub in ipairs(ids) do table.insert(ready, {task, sub, capability[sub], priority}) end
local handed, cached, left = hand_out(ready, PAYLOAD[10], PAYLOAD[11], finished)
return cjson.encode({task, 1, {handed = handed, cached = cached, ready = left,
  finished = finished, statuses = statuses_of(finished), ended = ENDED, goals = GOALS,
  traces = TRACES}})
