-- Compact finished tasks (keys.py): each task's subtask hashes and event log,
-- as the supervisor read them, become one string (`archive`), and its hash
-- names the end it was compacted at (`archived`). Nothing is done to a task
-- unless it is still as read: ended at `token`, not archived, its log ending
-- at `last_event`. A large task is compacted in parts: the first call
-- (first = 1) stores the archive -- from then on readers use it -- and
-- deletes the log and its share of subtask hashes; later calls delete the
-- rest while the task is still archived at the same end.
-- PAYLOAD: {CompactArgs, ...}. Returns CompactReply.
local done = {}
for i, item in ipairs(PAYLOAD) do
  local task, token, blob, last_event, subs, first = unpack(item) -- CompactArgs
  local tk = k_task(task)
  local v = redis.call('HMGET', tk, 'status', 'finished_at', 'archived')
  done[i] = 0
  if first == 1 then
    if not v[1] or not TASK_TERMINAL[v[1]] or v[3] then
      -- Gone (expired), running again (reopen took it off the queue) or
      -- already compacted: nothing to do now or later.
      redis.call('ZREM', k_compact(), task)
    else
      local newest = redis.call('XREVRANGE', k_events(task), '+', '-', 'COUNT', 1)
      local last = newest[1] and newest[1][1] or ''
      if v[2] ~= token or last ~= last_event then
        -- Something happened to it since it was read: read it again later.
        redis.call('ZADD', k_compact(), NOW, task)
      else
        local ak = k_archive(task)
        redis.call('SET', ak, blob)
        local ttl = redis.call('PTTL', tk)
        if ttl > 0 then redis.call('PEXPIRE', ak, ttl) end
        redis.call('HSET', tk, 'archived', token)
        redis.call('UNLINK', k_events(task))
        redis.call('ZREM', k_compact(), task)
        done[i] = 1
      end
    end
  elseif v[3] == token then
    done[i] = 1
  end
  if done[i] == 1 then
    for _, sub in ipairs(subs) do
      redis.call('UNLINK', k_subtask(task, sub))
    end
  end
end
return cjson.encode({done = done})
