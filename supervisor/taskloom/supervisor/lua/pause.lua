-- A person pauses a task (nothing new starts; what runs finishes and
-- commits) or resumes it (its READY subtasks go back to the queue). Pausing
-- a paused task, or resuming a running one, changes nothing.
-- Returns ControlReply.
local task, paused, actor, reason = unpack(PAYLOAD) -- PauseArgs
local tk = k_task(task)
local v = redis.call('HMGET', tk, 'status', 'paused')
if not v[1] then
  return cjson.encode({task_status = ''})
end
if TASK_TERMINAL[v[1]] then
  return cjson.encode({task_status = v[1], conflict = 1, refused = 'task ' .. task ..
    ' already ended as ' .. v[1] .. '; only an unfinished task can be paused or resumed'})
end
local ready = {}
if paused == 1 and v[2] ~= '1' then
  redis.call('HSET', tk, 'paused', '1', 'updated_at', NOW)
  emit(task, 'task.paused', '', v[1], 'paused ' .. by(actor, reason) ..
    ': nothing new starts; what runs finishes', 0, '', '', actor)
elseif paused == 0 and v[2] == '1' then
  redis.call('HDEL', tk, 'paused')
  redis.call('HSET', tk, 'updated_at', NOW)
  emit(task, 'task.resumed', '', v[1], 'resumed ' .. by(actor, reason), 0, '', '', actor)
  local priority = priority_of(task)
  for _, sub in ipairs(redis.call('LRANGE', k_subtasks(task), 0, -1)) do
    local s = redis.call('HMGET', k_subtask(task, sub), 'status', 'capability')
    if s[1] == 'READY' then table.insert(ready, {task, sub, s[2], priority}) end
  end
end
return cjson.encode({task_status = v[1], ready = ready})
