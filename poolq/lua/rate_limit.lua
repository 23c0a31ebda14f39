-- A tenant's request token bucket: `rate` tokens a second, at most `burst` saved up.
--
-- KEYS: 1 the tenant's bucket
-- ARGV: 1 rate (tokens per second), 2 burst
-- Returns {1, 0} when the request may go on, {0, ms} when it must wait ms.
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1] or burst)
local at = tonumber(b[2] or now)
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local allowed, wait = 1, 0
if tokens >= 1 then
  tokens = tokens - 1
else
  allowed, wait = 0, math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait}
