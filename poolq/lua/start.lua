-- A node agent starts a job placed on it: only a PENDING job placed on this node,
-- with no stop requested, becomes RUNNING, recording which agent (its incarnation)
-- runs it, and when its runtime limit ends: the job's own, else its tenant's, else
-- the node's. Anything else is skipped.
--
-- Safe to run twice: a job this incarnation already started answers "started" again
-- (with the same runtime deadline), so an agent that lost the reply learns that it
-- must run the job.
--
-- KEYS: 1 job, 2 node inbox, 3 the tenant's status counts, 4 the tenant's limits
-- ARGV: 1 ref, 2 node id, 3 message, 4 the agent's incarnation, 5 the node's runtime
--       limit ms ('' none)
-- Returns {code, ms left of its runtime limit (0: no limit), attempt, the limit (ms), whose
-- limit it is ('job', 'tenant', 'node'; recorded as run_limit_by)}: code 1 started, 0 skip,
-- 2 a stop was requested (the agent ends it STOPPED). (worker.agent.Started)
--! include lib/counts.lua
--! include lib/changes.lua
--! include lib/array.lua
redis.call('ZREM', KEYS[2], ARGV[1])
local j = redis.call('HMGET', KEYS[1], 'status', 'node', 'stop', 'runner', 'run_deadline', 'attempt', 'rt_limit', 'aidx',
  'start_time', 'run_limit_by')
local attempt = tonumber(j[6] or '1')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if j[1] == 'RUNNING' and j[2] == ARGV[2] and j[4] == ARGV[4] then
  if not (j[5] and j[9]) then return {1, 0, attempt, 0, ''} end
  return {1, math.max(tonumber(j[5]) - now, 1), attempt, tonumber(j[5]) - tonumber(j[9]), j[10] or ''}
end
if j[1] ~= 'PENDING' or j[2] ~= ARGV[2] then return {0, 0, attempt, 0, ''} end
if j[3] and j[3] ~= '' then return {2, 0, attempt, 0, ''} end
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'start_time', now, 'message', ARGV[3], 'runner', ARGV[4])
local tenant_limit = tonumber(redis.call('HGET', KEYS[4], 'runtime_limit_ms') or '0')
local limit, whose = 0, ''
if j[7] then limit, whose = tonumber(j[7]), 'job'
elseif tenant_limit > 0 then limit, whose = tenant_limit, 'tenant'
elseif ARGV[5] ~= '' then limit, whose = tonumber(ARGV[5]), 'node' end
if limit > 0 then redis.call('HSET', KEYS[1], 'run_deadline', now + limit, 'run_limit_by', whose) end
count(KEYS[3], 'PENDING', -1)
count(KEYS[3], 'RUNNING', 1)
job_changed(KEYS[3], ARGV[1], 'RUNNING', ARGV[2])
count_in_array(KEYS[1], j[8], 'PENDING', -1)
count_in_array(KEYS[1], j[8], 'RUNNING', 1)
return {1, limit, attempt, limit, whose}
