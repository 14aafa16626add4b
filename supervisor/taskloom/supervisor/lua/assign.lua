-- Assign READY subtasks to workers (see assign_one in lib.lua): READY ->
-- ASSIGNED with attempt + 1, or SUCCEEDED from the cache.
-- PAYLOAD: {{task, sub, worker_id, worker_name, fingerprint}, ...}
-- Returns JSON: {assigned = {{index, attempt, title, instruction, capability,
--   params, inputs = {{dep, title, output}, ...}, timeout, stall, context_tokens,
--   context}, ...}, goals = {task = goal}, traces = {task = traceparent},
--   hits = {index, ...}, ready = {...}, finished = {task, ...}, statuses = {...}}
local assigned, hits, ready, finished = {}, {}, {}, {}
for i, item in ipairs(PAYLOAD) do
  local a = assign_one(item[1], item[2], item[3], item[4], item[5], ready, finished)
  if a == 'hit' then
    table.insert(hits, i)
  elseif a ~= nil then
    table.insert(a, 1, i)
    table.insert(assigned, a)
  end
end
return cjson.encode({assigned = assigned, goals = GOALS, traces = TRACES, hits = hits,
  ready = ready,
  statuses = statuses_of(finished), ended = ENDED,
  finished = finished})
