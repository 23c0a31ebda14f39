-- Store a tenant's working_dir package within the tenant's package budget.
-- Sizes are kept per name, with each package's expiry; expired entries are dropped
-- first, so the budget counts only what Redis still holds.
--
-- KEYS: 1 the package, 2 the tenant's package expiries (zset), 3 the tenant's package sizes (hash)
-- ARGV: 1 name, 2 bytes, 3 ttl s, 4 the tenant's budget in bytes
-- Returns {1, used} stored, or {0, used} when it would not fit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, expired in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[3], expired)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local used = 0
for _, size in ipairs(redis.call('HVALS', KEYS[3])) do used = used + tonumber(size) end
used = used - tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local size = string.len(ARGV[2])
if used + size > tonumber(ARGV[4]) then return {0, used} end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
redis.call('ZADD', KEYS[2], now + ttl * 1000, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return {1, used + size}
