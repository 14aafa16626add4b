-- The leader lease: at most one supervisor decides at a time.
-- PAYLOAD: {op, holder_or_token, ttl_ms}
--   acquire: take the lease if nobody holds it; the token is
--            "<epoch>/<holder>", epoch counting up with every new lease.
--   renew:   extend it if the token still holds it.
--   release: give it up if the token still holds it (a clean shutdown, so a
--            standby takes over at once rather than after the TTL).
-- Returns JSON: {ok = 1|0, token = the token now holding the lease or ''}
local op, arg, ttl = PAYLOAD[1], PAYLOAD[2], PAYLOAD[3]
local key = k_leader()
local current = redis.call('GET', key)
if op == 'acquire' then
  if current then
    return cjson.encode({ok = 0, token = current})
  end
  local token = redis.call('INCR', k_leader_epoch()) .. '/' .. arg
  redis.call('SET', key, token, 'NX', 'PX', ttl)
  return cjson.encode({ok = 1, token = token})
end
if current ~= arg then
  return cjson.encode({ok = 0, token = current or ''})
end
if op == 'renew' then
  redis.call('PEXPIRE', key, ttl)
  return cjson.encode({ok = 1, token = arg})
end
redis.call('DEL', key)
return cjson.encode({ok = 1, token = ''})
