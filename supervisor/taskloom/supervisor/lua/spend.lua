-- Add the usage of a planning call to the task's totals, and end the task if
-- that took it past its max_tokens. Returns SpendReply.
local task, usage = unpack(PAYLOAD) -- SpendArgs
local status = redis.call('HGET', k_task(task), 'status')
if status == false or status == nil or TASK_TERMINAL[status] then
  return cjson.encode({over = 0, held = {}})
end
add_usage(task, usage)
local held = enforce_budget(task)
if held == nil then
  return cjson.encode({over = 0, held = {}})
end
return cjson.encode({over = 1, held = held})
