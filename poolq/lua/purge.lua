-- Remove terminal jobs: their record, log and index entries. A job that is not
-- terminal is left alone (DELETE answers 409 for it).
--
-- KEYS: 1 terminal, then per job 4 keys: job hash, log, tenant index, tenant's status counts
-- ARGV: per job 2 values: ref, submission id
-- Returns per job: 1 removed, 0 not terminal, -1 no such job.
--! include lib/counts.lua
local out = {}
for i = 0, (#KEYS - 1) / 4 - 1 do
  local job, logkey, index, counts = KEYS[2 + i * 4], KEYS[3 + i * 4], KEYS[4 + i * 4], KEYS[5 + i * 4]
  local ref, id = ARGV[1 + i * 2], ARGV[2 + i * 2]
  local status = redis.call('HGET', job, 'status')
  if not status then
    redis.call('ZREM', KEYS[1], ref)
    redis.call('ZREM', index, id)
    out[#out + 1] = -1
  elseif status == 'SUCCEEDED' or status == 'FAILED' or status == 'STOPPED' then
    redis.call('DEL', job, logkey)
    count(counts, status, -1)
    redis.call('ZREM', index, id)
    redis.call('ZREM', KEYS[1], ref)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
