-- End the tasks whose max_duration has passed: FAILED with BUDGET_EXCEEDED.
-- Returns OutcomeReply: the tasks finished and the attempts workers held.
local limit = unpack(PAYLOAD) -- ExpireArgs
local finished, held = {}, {}
local due = redis.call('ZRANGEBYSCORE', k_deadlines(), '-inf', NOW, 'LIMIT', 0, limit)
for _, task in ipairs(due) do
  redis.call('ZREM', k_deadlines(), task)
  local v = redis.call('HMGET', k_task(task), 'status', 'max_duration')
  if v[1] == 'PLANNING' or v[1] == 'RUNNING' then
    local reason = 'BUDGET_EXCEEDED: the task ran past its max_duration of ' .. v[2] .. 's'
    for _, h in ipairs(finish_task(task, 'FAILED', reason, 'task.failed', reason,
        'BUDGET_EXCEEDED')) do
      table.insert(held, h)
    end
    table.insert(finished, task)
  end
end
return cjson.encode({finished = finished, held = held, statuses = statuses_of(finished),
  ended = ENDED})
