-- Read tasks as they are now, each with its subtasks: the answers a client's
-- Session gets for the tasks it waits for, all in one round trip. Reads
-- only: nothing waits for an fsync. PAYLOAD: SnapshotArgs. Returns
-- {[task] = {task = {field = value}, subtasks = {{field = value}, ...}}} for
-- the tasks that exist and have at most max_subtasks subtasks, and
-- {task = {...}, archived = 1} for a compacted one.
local task_ids, max_subtasks = unpack(PAYLOAD) -- SnapshotArgs
local found = {}
for _, task in ipairs(task_ids) do
  local raw = hash_of(k_task(task))
  if raw.archived then
    -- Compacted: the caller reads its archive.
    found[task] = {task = raw, archived = 1}
  elseif next(raw) ~= nil then
    local ids = redis.call('LRANGE', k_subtasks(task), 0, max_subtasks)
    if #ids <= max_subtasks then
      local subs = {}
      for i, sub in ipairs(ids) do
        subs[i] = hash_of(k_subtask(task, sub))
      end
      found[task] = {task = raw, subtasks = subs}
    end
  end
end
return cjson.encode(found)
