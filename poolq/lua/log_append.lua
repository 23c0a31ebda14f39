-- Append a job's output to its log tail, a list of chunks holding at most max bytes
-- in all: whole chunks are dropped from the front, so an append costs O(its own
-- bytes), whatever the tail holds. The job's log_base counts the bytes dropped before
-- the tail, so that an offset into the whole output stays meaningful for
-- `logs --follow`; log_len is what the tail holds now.
--
-- Safe to run twice: the caller says at which offset of the whole output its bytes
-- begin, and bytes the tail already has are not appended again. Bytes that never
-- arrived (a gap) empty the tail, which must be contiguous.
--
-- KEYS: 1 log, 2 job hash
-- ARGV: 1 data, 2 max bytes, 3 the offset in the whole output where data begins
-- Returns the log's end offset in the whole output, or -1 if the job is gone.
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local f = redis.call('HMGET', KEYS[2], 'log_base', 'log_len')
local length = tonumber(f[2] or '0')
local have = tonumber(f[1] or '0') + length
local data, max, from = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local new_end = from + #data
if new_end <= have then return have end  -- already appended
if from < have then
  data = string.sub(data, have - from + 1)
elseif from > have then
  redis.call('DEL', KEYS[1])
  length = 0
end
if #data > max then data = string.sub(data, -max) end
redis.call('RPUSH', KEYS[1], data)
length = length + #data
while length > max do
  length = length - #redis.call('LPOP', KEYS[1])
end
redis.call('HSET', KEYS[2], 'log_base', new_end - length, 'log_len', length)
return new_end
