-- Resolve the dependents of one job that ended (the oldest in poolq:resolve, pushed by
-- finish.lua, or by submit.lua for a dependency that had ended already).
--
-- Each dependent is taken off the ended job's dependents once (SPOP), so its count of
-- dependencies left goes down once per dependency. An afterok dependent of a job that
-- did not succeed is marked in poolq:dependency_failed, for the duties to end it
-- FAILED / DEPENDENCY_FAILED through finish.lua (which resolves its own dependents in
-- turn). A dependent whose last dependency is resolved is put in line as submit.lua
-- would have: its shape's queue, the shape ready unless blocked, and its scheduling
-- deadline counted from now. Dependents no longer PENDING (stopped meanwhile) are
-- skipped. The entry leaves poolq:resolve once its dependents are all taken.
--
-- Safe to run twice: a dependent already taken is not in the set any more.
--
-- KEYS: 1 resolve, 2 dependency failed, 3 shapes:ready, 4 shapes:blocked, 5 deadlines
-- ARGV: 1 the job key prefix (poolq.keys.JOB_PREFIX), 2 the shape key prefix, 3 most
--       dependents to take in one run
-- Returns {dependents put in line, 1 if poolq:resolve has more, jobs marked to fail}.
local ended = redis.call('LINDEX', KEYS[1], -1)
if not ended then return {0, 0, redis.call('HLEN', KEYS[2])} end
local prefix = ARGV[1]
local status = redis.call('HGET', prefix .. ended, 'status')
local id = string.sub(ended, string.find(ended, ':', 1, true) + 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local set = prefix .. ended .. ':dependents'
local queued = 0
for _, member in ipairs(redis.call('SPOP', set, tonumber(ARGV[3]))) do
  local kind, ref = string.match(member, '^(%a+)|(.+)$')
  local job = prefix .. ref
  local j = redis.call('HMGET', job, 'status', 'deps_left', 'shape', 'seq', 'timeout_ms')
  if j[1] == 'PENDING' and tonumber(j[2] or '0') > 0 then
    if kind == 'ok' and status ~= 'SUCCEEDED' then
      redis.call('HSETNX', KEYS[2], ref, 'dependency ' .. id .. ' ended ' .. (status or 'DELETED')
        .. ': its afterok dependents cannot run')
    elseif redis.call('HINCRBY', job, 'deps_left', -1) == 0 and redis.call('HEXISTS', KEYS[2], ref) == 0 then
      redis.call('HDEL', job, 'deps_left')
      redis.call('HSET', job, 'att_base', redis.call('HGET', ARGV[2] .. j[3], 'attempts') or '0')
      redis.call('ZADD', ARGV[2] .. j[3] .. ':q', j[4], ref)
      if not redis.call('ZSCORE', KEYS[4], j[3]) then redis.call('ZADD', KEYS[3], 'LT', j[4], j[3]) end
      local timeout = tonumber(j[5] or '0')
      if timeout > 0 then  -- its deadline runs from when it may be placed
        redis.call('HSET', job, 'deadline', now + timeout)
        redis.call('ZADD', KEYS[5], now + timeout, ref)
      end
      queued = queued + 1
    end
  end
end
if redis.call('SCARD', set) == 0 then redis.call('RPOP', KEYS[1]) end
return {queued, redis.call('LLEN', KEYS[1]) > 0 and 1 or 0, redis.call('HLEN', KEYS[2])}
