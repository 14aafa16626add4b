-- A planned task gets its plan (see store_plan in lib.lua) -- unless it is
-- no longer PLANNING: cancelled while the model thought, it must not come
-- back to life. Returns StorePlanReply.
local task, result_from, rows = unpack(PAYLOAD) -- StorePlanArgs
if redis.call('HGET', k_task(task), 'status') ~= 'PLANNING' then
  return cjson.encode({ok = 0, ready = {}})
end
return cjson.encode({ok = 1, ready = store_plan(task, result_from, rows)})
