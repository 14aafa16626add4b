-- The janitor found these tasks expired: what they stored leaves their
-- owners' usage (finish_task recorded how much, and whose, in the sizes
-- hash). Returns {released = how many}.
local tasks = unpack(PAYLOAD) -- ReleaseArgs
local released = 0
for _, task in ipairs(tasks) do
  local entry = redis.call('HGET', k_sizes(), task)
  if entry and redis.call('EXISTS', k_task(task)) == 0 then
    local bytes, owner = string.match(entry, '^(%-?%d+) (.*)$')
    if owner and owner ~= '' then
      redis.call('HINCRBY', k_owner_usage(owner), 'bytes', -tonumber(bytes))
    end
    redis.call('HDEL', k_sizes(), task)
    released = released + 1
  end
end
return cjson.encode({released = released})
