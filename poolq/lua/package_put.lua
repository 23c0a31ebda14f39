-- Store a tenant's working_dir package within the tenant's package budget.
--
-- Safe to run twice: storing the same package again replaces it, and its size is
-- counted once.
--
-- KEYS: 1 the package, 2 the tenant's package sizes (hash), 3 packages (last use)
-- ARGV: 1 name, 2 bytes, 3 the tenant's budget in bytes, 4 the package's member in packages
-- Returns {1, used} stored, or {0, used} when it would not fit.
local used = 0
for _, size in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(size) end
used = used - tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local size = string.len(ARGV[2])
if used + size > tonumber(ARGV[3]) then return {0, used} end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], size)
redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[4])
return {1, used + size}
