-- Progress from a running handler, logged only for the attempt that holds
-- the subtask: a message (subtask.progress) and/or generated output
-- (subtask.output, streamed tokens).
-- PAYLOAD: {ProgressItem, ...}. Returns CommittedReply (0: stale).
local committed = {}
for i, item in ipairs(PAYLOAD) do
  local task, sub, attempt, message, text, worker_id, stream_budget = unpack(item) -- ProgressItem
  committed[i] = 0
  local status = held_by(task, sub, attempt, worker_id)
  if status then
    local sk = k_subtask(task, sub)
    local worker = redis.call('HGET', sk, 'worker')
    if message ~= '' then
      account(task, 0, #message)
      redis.call('HSET', sk, 'progress', message)
      emit(task, 'subtask.progress', sub, status, message, attempt, worker)
    end
    if text ~= nil and text ~= '' then
      -- A subtask's stream adds at most stream_budget bytes to the log; the
      -- piece that crosses it is replaced by one marker, later ones dropped.
      local streamed = redis.call('HINCRBY', sk, 'streamed', #text)
      if streamed <= stream_budget then
        account(task, 0, #text)
        emit(task, 'subtask.output', sub, status, text, attempt, worker)
      elseif streamed - #text <= stream_budget then
        emit(task, 'subtask.output', sub, status,
          '\n[… stream cut: this subtask streamed more than ' .. stream_budget ..
          ' bytes (TASKLOOM_MAX_STREAM_BYTES); its output is not affected]', attempt, worker)
      end
    end
    committed[i] = 1
  end
end
return cjson.encode({committed = committed})
