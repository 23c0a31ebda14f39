-- Forget a tenant that has no job left (after retention removed its last one): its
-- counters, its change feed, its turn in placement and its metrics fields. Its quota stays (an admin
-- set it) and its packages and rate bucket expire on their own.
--
-- KEYS: 1 tenants set, 2 tenants served, 3 the tenant's status counts, 4 its usage,
--       5 its active index, 6 its job index, 7 stats, 8 fairshare, 9 its stems, 10 its change feed
-- ARGV: 1 tenant, 2.. the submission outcomes counted in stats (poolq.store.Submitted)
-- Returns 1 forgotten, 0 it still has jobs.
if redis.call('ZCARD', KEYS[6]) > 0 or redis.call('ZCARD', KEYS[5]) > 0 then return 0 end
for _, count in ipairs(redis.call('HVALS', KEYS[3])) do
  if tonumber(count) ~= 0 then return 0 end
end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1], ARGV[1] .. '@')
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[9], KEYS[10])
for i = 2, #ARGV do redis.call('HDEL', KEYS[7], 'submissions:' .. ARGV[1] .. ':' .. ARGV[i]) end
return 1
