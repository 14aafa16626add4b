-- A planned task gets its plan (see store_plan in lib.lua) -- unless it is
-- no longer PLANNING: cancelled while the model thought, it must not come
-- back to life. Returns StorePlanReply.
local task, result_from, rows = unpack(PAYLOAD) -- StorePlanArgs
local v = redis.call('HMGET', k_task(task), 'status', 'approve_plan')
if v[1] ~= 'PLANNING' then
  return cjson.encode({ok = 0, ready = {}})
end
local ready = store_plan(task, result_from, rows, v[2] == '1')
return cjson.encode({ok = 1, ready = ready, awaiting = AWAITING})
