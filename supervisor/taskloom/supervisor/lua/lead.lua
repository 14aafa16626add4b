-- The leader lease: at most one supervisor decides at a time.
--   acquire: take the lease if nobody holds it, or if it still names this
--            holder (a supervisor that stepped down, or restarted with the
--            same identity, need not wait for its own lease to lapse); the
--            token is "<epoch>/<holder>", epoch counting up with every new
--            lease, so writes fenced with an earlier token stay refused.
--   renew:   extend it if the token (holder) still holds it.
--   release: give it up if the token still holds it (a clean shutdown, so a
--            standby takes over at once rather than after the TTL).
-- Returns LeadReply: ok, the token now holding the lease ('' for none), and
-- for an acquire that succeeded, the token it replaced ('' for none).
local op, holder, ttl_ms = unpack(PAYLOAD) -- LeadArgs
local key = k_leader()
local current = redis.call('GET', key)
if op == 'acquire' then
  local slash = current and string.find(current, '/', 1, true)
  if current and (slash and string.sub(current, slash + 1) or current) ~= holder then
    return cjson.encode({ok = 0, token = current})
  end
  local token = redis.call('INCR', k_leader_epoch()) .. '/' .. holder
  redis.call('SET', key, token, 'PX', ttl_ms)
  return cjson.encode({ok = 1, token = token, was = current or ''})
end
if current ~= holder then
  return cjson.encode({ok = 0, token = current or ''})
end
if op == 'renew' then
  redis.call('PEXPIRE', key, ttl_ms)
  return cjson.encode({ok = 1, token = holder})
end
redis.call('DEL', key)
return cjson.encode({ok = 1, token = ''})
