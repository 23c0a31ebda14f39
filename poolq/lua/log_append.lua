-- Append a job's output to its log tail, keeping only the last max bytes. The bytes
-- dropped from the front are counted in the job's log_base, so that an offset into
-- the whole output stays meaningful for `logs --follow` (DESIGN.md 2.3).
--
-- KEYS: 1 log, 2 job hash
-- ARGV: 1 data, 2 max bytes
-- Returns the log's end offset in the whole output, or -1 if the job is gone.
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local length = redis.call('APPEND', KEYS[1], ARGV[1])
local max = tonumber(ARGV[2])
local base = tonumber(redis.call('HGET', KEYS[2], 'log_base') or '0')
if length > max then
  local drop = length - max
  redis.call('SET', KEYS[1], redis.call('GETRANGE', KEYS[1], drop, -1))
  base = redis.call('HINCRBY', KEYS[2], 'log_base', drop)
  length = max
end
return base + length
