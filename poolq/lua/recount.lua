-- Recount a tenant's PENDING and RUNNING jobs from their records, and lift any status
-- count below zero to zero. The counts follow each change of status (submit, start,
-- finish, purge); a change that reached them twice, or not at all, would leave them off
-- for good (issue 11: two redis-servers appended to one append-only file, and its
-- replay held each start twice: PENDING read -1). A placement worker's duties recount
-- each tenant about once a minute (worker/duties.py).
--
-- An array in the active index counts its tasks not yet created as PENDING
-- (lib/array.lua); the tasks created are in the index themselves.
--
-- KEYS: 1 the tenant's active index (its PENDING and RUNNING jobs), 2 its status counts,
--       3.. the job hashes of the active index as the caller read it
-- ARGV: 1.. the submission ids of those jobs, in the same order
-- Returns {fixed, pending, running}: fixed 1 when a count was wrong (and is now right),
-- 0 when all were right; {-1} when the active index changed since the caller read it
-- (nothing is changed: the next recount sees the new one).
if redis.call('ZCARD', KEYS[1]) ~= #ARGV then return {-1} end
local pending, running = 0, 0
for i = 1, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then return {-1} end
  local status = redis.call('HGET', KEYS[2 + i], 'status')
  if status == 'ARRAY' then
    local a = redis.call('HMGET', KEYS[2 + i], 'acount', 'anext', 'askip', 'ended')
    if not a[4] or a[4] == '' then
      pending = pending + math.max(tonumber(a[1]) - tonumber(a[2]) - tonumber(a[3]), 0)
    end
  elseif status == 'PENDING' then
    pending = pending + 1
  elseif status == 'RUNNING' then
    running = running + 1
  end
end
local fixed = 0
local counts = redis.call('HGETALL', KEYS[2])
for i = 1, #counts, 2 do
  if tonumber(counts[i + 1]) < 0 then
    redis.call('HSET', KEYS[2], counts[i], 0)
    fixed = 1
  end
end
for status, n in pairs({PENDING = pending, RUNNING = running}) do
  if tonumber(redis.call('HGET', KEYS[2], status) or '0') ~= n then
    redis.call('HSET', KEYS[2], status, n)
    fixed = 1
  end
end
return {fixed, pending, running}
