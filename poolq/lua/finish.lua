-- Move a job to a terminal status, releasing whatever it holds, exactly once.
-- Every way a job ends (its entrypoint exits, a stop, a lost node, a scheduling
-- deadline, a runtime_env failure) goes through here, so the release happens in
-- one place: the reservation string "res" is emptied as the node (and its devices)
-- are credited, and a terminal job is never touched again.
--
-- An attempt that fails in a way the job's retry policy retries, with attempts left
-- and no stop requested, ends that attempt instead: the job is released the same way,
-- the attempt's outcome is kept in its record, and it goes back to PENDING, placed
-- again after its backoff (poolq:retries, then retry_due.lua). Its callers make sure
-- the attempt's processes are gone first (docs/faults.md, "Fencing").
--
-- Safe to run twice: a terminal job is left alone (answer 0), and a stop request
-- carries a token, so that its retry answers as the first run did. The counters for
-- /metrics (an attempt's run time, how jobs ended) are added to only on the way that
-- moves the job, so a second run, which moves nothing, counts nothing.
--
-- KEYS: 1 job, 2 node hash, 3 node jobs, 4 node inbox, 5 shape queue, 6 deadlines,
--       7 claimed, 8 terminal, 9 inventory log, 10 kick, 11 placement wake flag,
--       12 the tenant's active index, 13 the tenant's status counts, 14 its usage,
--       15 suspects, 16 claims, 17 shape hash, 18 the tenant's package use,
--       19 packages, 20 retries, 21 stats, 22 its dependents, 23 resolve, 24 fairshare,
--       25 broken gangs
--       (node keys may be any placeholder key when the caller saw no node)
-- ARGV: 1 ref, 2 node id the caller saw ('' = unplaced), 3 status, 4 error_type,
--       5 message, 6 exit code ('' = none), 7 statuses it may move from (",A,B,"),
--       8 wake ttl ms, 9 mode: '' (end it), 'deadline' (only once the scheduling
--       deadline has passed), 'stop' (a stop request: flag it, end it if PENDING,
--       leave a RUNNING job to its agent), 10 the stop request's token (mode 'stop'),
--       11 the attempt the caller ends ('' any: an attempt that ended already is not
--       ended again by a late call for it), 12 the run duration buckets ("100,1000,…"
--       ms: poolq.model.RUN_DURATION_BUCKETS_MS), 13 the fair-share half-life ms,
--       14.. extra field/value pairs to set
-- Returns {code, wake} (poolq.store.Ending): code 1 moved, 0 not allowed (already
-- terminal, or from a status not listed, or deadline not reached), 2 stop flagged on a
-- RUNNING job, 3 the attempt ended and the job will run again, -1 the node changed:
-- read again, -2 no such job.
--
-- A job stopped by a preemption (preempt.lua set its stop flag and "preempted_by") ends
-- FAILED PREEMPTED with that message, and its retry policy may run it again; a user's
-- stop of it afterwards wins (STOPPED).
--
-- A gang member that ends before its gang was placed leaves the gang unable to place
-- whole: its shape joins the broken gangs, whose other members the duties end the same
-- way (worker/duties.py), in the same step that ends it, so that none is forgotten.
--
-- A task of an array is counted in its array's record too; the array ends (for
-- retention) with its last task (lib/array.lua).
--! include lib/counts.lua
--! include lib/changes.lua
--! include lib/fair_share.lua
--! include lib/array.lua
local j = redis.call('HMGET', KEYS[1], 'status', 'node', 'res', 'stop', 'deadline', 'pkg', 'retry', 'attempt',
  'devs', 'start_time', 'exit_code', 'timeout_ms', 'seq', 'prev', 'gang', 'shape', 'preempted_by', 'aidx')
local status = j[1]
if not status then return {-2, 0} end
if ARGV[9] == 'stop' and j[4] == ARGV[10] then  -- this stop request already ran
  return {status == 'RUNNING' and 2 or 1, 0}
end
if not string.find(ARGV[7], ',' .. status .. ',', 1, true) then return {0, 0} end
if ARGV[11] and ARGV[11] ~= '' and ARGV[11] ~= (j[8] or '1') then return {0, 0} end
local node = j[2] or ''
if node ~= ARGV[2] then return {-1, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[9] == 'deadline' then
  if not j[5] or j[5] == '' or tonumber(j[5]) > now then return {0, 0} end
elseif ARGV[9] == 'stop' then
  -- One step, so that a stop cannot be left half done: flagged but never ended.
  redis.call('HSET', KEYS[1], 'stop', ARGV[10])
  redis.call('HDEL', KEYS[1], 'preempted_by')  -- the user's stop wins over a preemption
  j[17] = nil
  if status == 'RUNNING' then return {2, 0} end
end
-- A stop flag set by a preemption (preempt.lua) ends the job PREEMPTED, with the message
-- naming the job that needed its room, and lets its retry policy run it again.
local preempted = j[17] and j[17] ~= ''
local stopping = ((j[4] and j[4] ~= '') or ARGV[9] == 'stop') and not preempted
local new_status, error_type, message = ARGV[3], ARGV[4], ARGV[5]
-- Once a stop is requested the job ends STOPPED, even if it exits 0 meanwhile.
if stopping and (new_status == 'SUCCEEDED' or error_type == 'ENTRYPOINT_FAILED') then
  new_status, error_type, message = 'STOPPED', 'STOPPED_BY_USER', 'stopped by user request'
end
if preempted and (new_status == 'SUCCEEDED' or new_status == 'STOPPED' or error_type == 'ENTRYPOINT_FAILED') then
  new_status, error_type, message = 'FAILED', 'PREEMPTED', j[17]
end

-- Will it run again? "max attempts|OUTCOME,OUTCOME|backoff ms"
local attempt = tonumber(j[8] or '1')
local again, backoff = false, 0
if new_status == 'FAILED' and not stopping and j[7] and j[7] ~= '' and ARGV[9] ~= 'deadline' then
  local max, on, base = string.match(j[7], '^(%d+)|([^|]*)|(%d+)$')
  if max and attempt < tonumber(max) and string.find(',' .. on .. ',', ',' .. error_type .. ',', 1, true) then
    again = true
    backoff = math.min(tonumber(base) * 2 ^ (attempt - 1), 3600000)
  end
end

-- Release what it holds (amounts, devices), once: "res" is emptied here and only here.
local wake = 0
local res = j[3] or ''
if node ~= '' and res ~= '' then
  settle(KEYS[24], string.sub(ARGV[1], 1, string.find(ARGV[1], ':', 1, true) - 1), KEYS[14], now, tonumber(ARGV[13]))
  for name, amount in string.gmatch(res, '([^=,]+)=(%d+)') do
    redis.call('HINCRBY', KEYS[2], 'res:' .. name, '-' .. amount)
    redis.call('HINCRBY', KEYS[14], name, '-' .. amount)
  end
  for name, id, milli in string.gmatch(j[9] or '', '([^:,]+):([^:,]+):(%d+)') do
    redis.call('HINCRBY', KEYS[2], 'dev:' .. name .. ':' .. id, '-' .. milli)
  end
  redis.call('HSET', KEYS[1], 'res', '')
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', 100000, '*', 'n', node)
  redis.call('SET', KEYS[10], '1')
  if redis.call('SET', KEYS[11], '1', 'NX', 'PX', ARGV[8]) then wake = 1 end
end
-- An attempt that ran: its run time, in the one bucket it falls in (the scrape adds up).
if status == 'RUNNING' and j[10] and j[10] ~= '' then
  local ran = math.max(0, now - tonumber(j[10]))
  local bucket = 'inf'
  for le in string.gmatch(ARGV[12], '%d+') do
    if ran <= tonumber(le) then bucket = le break end
  end
  redis.call('HINCRBY', KEYS[21], 'run_le:' .. new_status .. ':' .. bucket, 1)
  redis.call('HINCRBY', KEYS[21], 'run_sum_ms:' .. new_status, ran)
end
if node ~= '' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[16], ARGV[1])
redis.call('ZREM', KEYS[15], ARGV[1])

if again then
  -- The attempt's outcome joins the record's previous attempts (the last 20 kept).
  local previous = cjson.decode(j[14] or '[]')
  previous[#previous + 1] = {attempt = attempt, status = new_status, error_type = error_type, message = message,
    node = node, start_time = tonumber(j[10] or ''), end_time = now, exit_code = tonumber(ARGV[6] ~= '' and ARGV[6] or ''),
    devices = j[9] or ''}
  while #previous > 20 do table.remove(previous, 1) end
  local next_attempt = attempt + 1
  local due = now + backoff
  redis.call('HDEL', KEYS[1], 'node', 'pool', 'res', 'devs', 'start_time', 'runner', 'claim', 'exit_code',
    'run_deadline', 'run_limit_by', 'placed_time', 'attempts', 'reasons', 'error_type', 'stop', 'preempted_by')
  redis.call('HSET', KEYS[1], 'status', 'PENDING', 'attempt', next_attempt, 'prev', cjson.encode(previous),
    'att_base', redis.call('HGET', KEYS[17], 'attempts') or '0',
    'message', 'attempt ' .. attempt .. ' ended ' .. error_type .. ' (' .. message .. '); attempt ' .. next_attempt
      .. ' waits for placement')
  for i = 14, #ARGV, 2 do
    if ARGV[i] ~= 'attempts' and ARGV[i] ~= 'reasons' then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  end
  -- Its scheduling deadline counts again from when it may be placed.
  local timeout = tonumber(j[12] or '0')
  if timeout > 0 then
    redis.call('HSET', KEYS[1], 'deadline', due + timeout)
    redis.call('ZADD', KEYS[6], due + timeout, ARGV[1])
  else
    redis.call('HSET', KEYS[1], 'deadline', '')
  end
  redis.call('ZADD', KEYS[20], due, ARGV[1])
  count(KEYS[13], status, -1)
  count(KEYS[13], 'PENDING', 1)
  job_changed(KEYS[13], ARGV[1], 'PENDING')
  count_in_array(KEYS[1], j[18], status, -1)
  count_in_array(KEYS[1], j[18], 'PENDING', 1)
  redis.call('HINCRBY', KEYS[21], 'retried:' .. error_type, 1)
  return {3, wake}
end

redis.call('HSET', KEYS[1], 'status', new_status, 'error_type', error_type, 'message', message, 'end_time', now)
count(KEYS[13], status, -1)
count(KEYS[13], new_status, 1)
job_changed(KEYS[13], ARGV[1], new_status, node)
if j[18] then
  count_in_array(KEYS[1], j[18], status, -1)
  count_in_array(KEYS[1], j[18], new_status, 1)
  local cut = #j[18] + 1
  array_settle(string.sub(KEYS[1], 1, #KEYS[1] - cut), string.sub(ARGV[1], 1, #ARGV[1] - cut), KEYS[8], now)
end
redis.call('HINCRBY', KEYS[21], 'completed:' .. new_status .. ':' .. error_type, 1)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'exit_code', ARGV[6]) end
for i = 14, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[20], ARGV[1])
redis.call('ZADD', KEYS[8], now, ARGV[1])
if redis.call('EXISTS', KEYS[22]) == 1 then redis.call('LPUSH', KEYS[23], ARGV[1]) end  -- resolve.lua
if j[15] and j[15] ~= '' and node == '' and j[16] then redis.call('SADD', KEYS[25], j[16]) end
local tenant_end = string.find(ARGV[1], ':', 1, true)
redis.call('ZREM', KEYS[12], string.sub(ARGV[1], tenant_end + 1))
-- The shape's spec is kept while any of its jobs lives (forget_shape.lua).
if redis.call('HEXISTS', KEYS[17], 'spec') == 1 then redis.call('HINCRBY', KEYS[17], 'live', -1) end
if j[6] and j[6] ~= '' then  -- its package may expire once no live job uses it
  redis.call('HINCRBY', KEYS[18], j[6], -1)
  redis.call('ZADD', KEYS[19], 'XX', now, string.sub(ARGV[1], 1, tenant_end) .. j[6])
end
return {1, wake}
