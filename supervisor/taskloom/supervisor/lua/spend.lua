-- Add the usage of a planning call to the task's totals, and end the task if
-- that took it past its max_tokens. Returns OutcomeReply: the task in
-- finished if it ended.
local task, usage = unpack(PAYLOAD) -- SpendArgs
local status = redis.call('HGET', k_task(task), 'status')
if status == false or status == nil or TASK_TERMINAL[status] then
  return cjson.encode({})
end
add_usage(task, usage)
local held = enforce_budget(task)
if held == nil then
  return cjson.encode({})
end
return cjson.encode({held = held, finished = {task}, statuses = {'FAILED'}, ended = ENDED})
