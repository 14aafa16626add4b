-- Undo compact.lua for a task a person runs again: rework.lua refuses an
-- archived task, the supervisor reads the archive and passes it here, then
-- asks again. The subtask hashes and the log come back as they were (the
-- events with their own ids, so cursors stay valid), expiring with the task,
-- which waits to be compacted again.
-- PAYLOAD: RestoreArgs. Returns OkReply (ok = 0: the task was not, or no
-- longer, archived at `token`).
local task, token, subtasks, events = unpack(PAYLOAD) -- RestoreArgs
local tk = k_task(task)
if redis.call('HGET', tk, 'archived') ~= token then
  return cjson.encode({ok = 0})
end
local ttl = redis.call('PTTL', tk)
for _, row in ipairs(subtasks) do
  local sk = k_subtask(task, row[1])
  redis.call('HSET', sk, unpack(row, 2))
  if ttl > 0 then redis.call('PEXPIRE', sk, ttl) end
end
local ek = k_events(task)
for _, entry in ipairs(events) do
  redis.call('XADD', ek, entry[1], unpack(entry, 2))
end
if ttl > 0 then redis.call('PEXPIRE', ek, ttl) end
redis.call('HDEL', tk, 'archived')
redis.call('DEL', k_archive(task))
redis.call('ZADD', k_compact(), NOW, task)
return cjson.encode({ok = 1})
