-- Assign READY subtasks to workers (see assign_one in lib.lua): READY ->
-- ASSIGNED with attempt + 1, or SUCCEEDED from the cache.
-- PAYLOAD: {AssignItem, ...}. Returns AssignReply: the assignments by the
-- index of their item, the indexes answered from the cache, and what those
-- hits made READY or finished.
local assigned, hits, ready, finished = {}, {}, {}, {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, worker_id, worker, fingerprint = unpack(item) -- AssignItem
  local a = assign_one(task, sub, worker_id, worker, fingerprint, ready, finished)
  if a == 'hit' then
    table.insert(hits, i)
  elseif a ~= nil then
    table.insert(a, 1, i)
    table.insert(assigned, a)
  end
end
return cjson.encode({assigned = assigned, goals = GOALS, traces = TRACES, hits = hits,
  ready = ready, statuses = statuses_of(finished), ended = ENDED, finished = finished,
  awaiting = AWAITING})
