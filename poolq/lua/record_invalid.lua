-- Record a queue message that failed validation but named a submission id, so the
-- publisher polling that id sees FAILED / INVALID_REQUEST instead of "not found".
-- An id that already holds a job is left alone.
--
-- KEYS: 1 job hash, 2 tenant index, 3 terminal, 4 seq counter, 5 tenant's status counts,
--       6 tenants set
-- ARGV: 1 spec JSON, 2 message, 3 submission id, 4 ref, 5 tenant
-- Returns 1 recorded, 0 the id was taken.
--! include lib/counts.lua
--! include lib/changes.lua
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'fp', 'invalid', 'status', 'FAILED',
  'error_type', 'INVALID_REQUEST', 'message', ARGV[2], 'submit_time', now, 'end_time', now,
  'deadline', '', 'attempts', '0', 'reasons', '[]', 'res', '')
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[3])
redis.call('ZADD', KEYS[3], now, ARGV[4])
count(KEYS[5], 'FAILED', 1)
job_changed(KEYS[5], ARGV[4], 'FAILED')
redis.call('SADD', KEYS[6], ARGV[5])
return 1
