-- Move a job to a terminal status, releasing whatever it holds, exactly once.
-- Every way a job ends (its entrypoint exits, a stop, a lost node, a scheduling
-- deadline, a runtime_env failure) goes through here, so the release happens in
-- one place: the reservation string "res" is emptied as the node is credited,
-- and a terminal job is never touched again.
--
-- Safe to run twice: a terminal job is left alone (answer 0), and a stop request
-- carries a token, so that its retry answers as the first run did.
--
-- KEYS: 1 job, 2 node hash, 3 node jobs, 4 node inbox, 5 shape queue, 6 deadlines,
--       7 claimed, 8 terminal, 9 inventory log, 10 kick, 11 placement wake flag,
--       12 the tenant's active index, 13 the tenant's status counts, 14 its usage,
--       15 suspects, 16 claims, 17 shape hash, 18 the tenant's package use,
--       19 packages
--       (node keys may be any placeholder key when the caller saw no node)
-- ARGV: 1 ref, 2 node id the caller saw ('' = unplaced), 3 status, 4 error_type,
--       5 message, 6 exit code ('' = none), 7 statuses it may move from (",A,B,"),
--       8 wake ttl ms, 9 mode: '' (end it), 'deadline' (only once the scheduling
--       deadline has passed), 'stop' (a stop request: flag it, end it if PENDING,
--       leave a RUNNING job to its agent), 10 the stop request's token (mode 'stop'),
--       11.. extra field/value pairs to set
-- Returns {code, wake}: code 1 moved, 0 not allowed (already terminal, or from a
-- status not listed, or deadline not reached), 2 stop flagged on a RUNNING job,
-- -1 the node changed: read again, -2 no such job.
local j = redis.call('HMGET', KEYS[1], 'status', 'node', 'res', 'stop', 'deadline', 'pkg')
local status = j[1]
if not status then return {-2, 0} end
if ARGV[9] == 'stop' and j[4] == ARGV[10] then  -- this stop request already ran
  return {status == 'RUNNING' and 2 or 1, 0}
end
if not string.find(ARGV[7], ',' .. status .. ',', 1, true) then return {0, 0} end
local node = j[2] or ''
if node ~= ARGV[2] then return {-1, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[9] == 'deadline' then
  if not j[5] or j[5] == '' or tonumber(j[5]) > now then return {0, 0} end
elseif ARGV[9] == 'stop' then
  -- One step, so that a stop cannot be left half done: flagged but never ended.
  redis.call('HSET', KEYS[1], 'stop', ARGV[10])
  if status == 'RUNNING' then return {2, 0} end
end
local new_status, error_type, message = ARGV[3], ARGV[4], ARGV[5]
-- Once a stop is requested the job ends STOPPED, even if it exits 0 meanwhile.
if j[4] and j[4] ~= '' and (new_status == 'SUCCEEDED' or error_type == 'ENTRYPOINT_FAILED') then
  new_status, error_type, message = 'STOPPED', 'STOPPED_BY_USER', 'stopped by user request'
end
redis.call('HSET', KEYS[1], 'status', new_status, 'error_type', error_type, 'message', message, 'end_time', now)
redis.call('HINCRBY', KEYS[13], status, -1)
redis.call('HINCRBY', KEYS[13], new_status, 1)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'exit_code', ARGV[6]) end
for i = 11, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local wake = 0
local res = j[3] or ''
if node ~= '' and res ~= '' then
  for name, amount in string.gmatch(res, '([^=,]+)=(%d+)') do
    redis.call('HINCRBY', KEYS[2], 'res:' .. name, '-' .. amount)
    redis.call('HINCRBY', KEYS[14], name, '-' .. amount)
  end
  redis.call('HSET', KEYS[1], 'res', '')
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', 100000, '*', 'n', node)
  redis.call('SET', KEYS[10], '1')
  if redis.call('SET', KEYS[11], '1', 'NX', 'PX', ARGV[8]) then wake = 1 end
end
if node ~= '' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[16], ARGV[1])
redis.call('ZREM', KEYS[15], ARGV[1])
redis.call('ZADD', KEYS[8], now, ARGV[1])
local tenant_end = string.find(ARGV[1], ':', 1, true)
redis.call('ZREM', KEYS[12], string.sub(ARGV[1], tenant_end + 1))
-- The shape's spec is kept while any of its jobs lives (forget_shape.lua).
if redis.call('HEXISTS', KEYS[17], 'spec') == 1 then redis.call('HINCRBY', KEYS[17], 'live', -1) end
if j[6] and j[6] ~= '' then  -- its package may expire once no live job uses it
  redis.call('HINCRBY', KEYS[18], j[6], -1)
  redis.call('ZADD', KEYS[19], 'XX', now, string.sub(ARGV[1], 1, tenant_end) .. j[6])
end
return {1, wake}
