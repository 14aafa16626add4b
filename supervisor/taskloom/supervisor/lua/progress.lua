-- Progress from a running handler, logged only for the attempt that holds
-- the subtask: a message (subtask.progress) and/or generated output
-- (subtask.output, streamed tokens).
-- PAYLOAD: {{task, sub, attempt, message, text, worker_id}, ...}.
-- Returns JSON: {1|0, ...} (0: stale).
local out = {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt, message, text = item[1], item[2], item[3], item[4], item[5]
  out[i] = 0
  local status = held_by(task, sub, attempt, item[6])
  if status then
    local sk = k_subtask(task, sub)
    local worker = redis.call('HGET', sk, 'worker')
    if message ~= '' then
      redis.call('HSET', sk, 'progress', message)
      emit(task, 'subtask.progress', sub, status, message, attempt, worker)
    end
    if text ~= nil and text ~= '' then
      emit(task, 'subtask.output', sub, status, text, attempt, worker)
    end
    out[i] = 1
  end
end
return cjson.encode(out)
