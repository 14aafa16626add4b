-- Take from a rate limit's token bucket (shared by every worker and the
-- planner): one per request and per token, refilled continuously at the
-- limit's rate per minute, holding BURST seconds of it (at least one
-- request, and at least the tokens of one call). PAYLOAD: RateArgs. With
-- requests > 0, takes them and the tokens if the bucket has both (a call
-- larger than the bucket fits when it is full) and returns wait = 0, else
-- takes nothing and returns how long until it would have them; with
-- requests = 0 takes the tokens whatever is left (a reply's, after its
-- call: the bucket may go below zero). pause > 0 refuses everyone for that
-- long (a provider's 429). Returns RateReply.
local bucket, rpm, tpm, requests, tokens, pause, burst = unpack(PAYLOAD) -- RateArgs
local key = k_rate(bucket)
local now = tonumber(NOW)
local v = redis.call('HMGET', key, 'req', 'tok', 'at', 'paused_until')
local req_cap = math.max(rpm * burst / 60, 1)
local tok_cap = math.max(tpm * burst / 60, tokens)
local at = tonumber(v[3] or now) or now
local elapsed = math.max(now - at, 0)
local req = math.min(tonumber(v[1] or req_cap) + elapsed * rpm / 60, req_cap)
local tok = math.min(tonumber(v[2] or tok_cap) + elapsed * tpm / 60, tok_cap)
local paused = tonumber(v[4] or '0') or 0
if pause > 0 then paused = math.max(paused, now + pause) end
local wait = 0
if requests > 0 then
  if paused > now then
    wait = paused - now
  else
    if rpm > 0 and req < requests then wait = math.max(wait, (requests - req) * 60 / rpm) end
    if tpm > 0 and tok < tokens then wait = math.max(wait, (tokens - tok) * 60 / tpm) end
  end
  if wait == 0 then
    req = req - requests
    tok = tok - tokens
  end
elseif tpm > 0 then
  tok = tok - tokens
end
redis.call('HSET', key, 'req', req, 'tok', tok, 'at', now, 'paused_until', paused)
-- An idle bucket is full again within a minute: it need not outlive that.
redis.call('EXPIRE', key, math.ceil(math.max(paused - now, 0)) + 120)
return cjson.encode({wait = wait})
