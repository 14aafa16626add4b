-- A planned task gets its plan (see store_plan in lib.lua) -- unless it is
-- no longer PLANNING: cancelled while the model thought, it must not come
-- back to life.
-- PAYLOAD: {task, result_from (ids), subtasks}. Returns JSON: the READY ids,
-- or false if the task is not PLANNING.
local task = PAYLOAD[1]
if redis.call('HGET', k_task(task), 'status') ~= 'PLANNING' then
  return cjson.encode(false)
end
return cjson.encode(store_plan(task, PAYLOAD[2], PAYLOAD[3]))
