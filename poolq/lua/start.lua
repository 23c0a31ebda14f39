-- A node agent starts a job placed on it: only a PENDING job placed on this node,
-- with no stop requested, becomes RUNNING, recording which agent (its incarnation)
-- runs it. Anything else is skipped.
--
-- Safe to run twice: a job this incarnation already started answers 1 again, so an
-- agent that lost the reply learns that it must run the job.
--
-- KEYS: 1 job, 2 node inbox, 3 the tenant's status counts
-- ARGV: 1 ref, 2 node id, 3 message, 4 the agent's incarnation
-- Returns 1 started, 0 skip, 2 a stop was requested (the agent ends it STOPPED).
redis.call('ZREM', KEYS[2], ARGV[1])
local j = redis.call('HMGET', KEYS[1], 'status', 'node', 'stop', 'runner')
if j[1] == 'RUNNING' and j[2] == ARGV[2] and j[4] == ARGV[4] then return 1 end
if j[1] ~= 'PENDING' or j[2] ~= ARGV[2] then return 0 end
if j[3] and j[3] ~= '' then return 2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'start_time', now, 'message', ARGV[3], 'runner', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'PENDING', -1)
redis.call('HINCRBY', KEYS[3], 'RUNNING', 1)
return 1
