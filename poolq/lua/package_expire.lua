-- Remove a package unused for the retention period, unless a PENDING or RUNNING job
-- still runs from it: then it is kept (its last use is now) and looked at again later.
--
-- Safe to run twice: a package already gone is only taken off the list.
--
-- KEYS: 1 the package, 2 the tenant's package sizes, 3 the tenant's package use, 4 packages
-- ARGV: 1 name, 2 the package's member in packages, 3 the cutoff ms (last use older: unused)
-- Returns 1 removed, 0 kept.
local last = redis.call('ZSCORE', KEYS[4], ARGV[2])
if last and tonumber(last) > tonumber(ARGV[3]) then return 0 end  -- used again meanwhile
if tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0') > 0 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
