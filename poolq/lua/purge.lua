-- Remove terminal jobs: their record, log and index entries. A job that is not
-- terminal is left alone (DELETE answers 409 for it). An array's record (lib/array.lua)
-- is terminal once none of its tasks is PENDING or RUNNING; removing it takes its tasks
-- never created out of the counts, and leaves its tasks' records alone (store.py removes
-- them first; retention, each in its turn).
--
-- KEYS: 1 terminal, then per job 5 keys: job hash, log, tenant index, tenant's status
--       counts, tenant's stems
-- ARGV: per job 2 values: ref, submission id
-- Returns per job: 1 removed, 0 not terminal, -1 no such job.
--! include lib/counts.lua
--! include lib/changes.lua
local function unstem(stems, id)  -- submit.lua counted a job named <stem>-<digits>
  local stem, index = string.match(id, '^(.+)-(%d+)$')
  if stem and index ~= '0' and string.sub(index, 1, 1) == '0' then stem = nil end
  if stem and redis.call('HINCRBY', stems, stem, -1) <= 0 then redis.call('HDEL', stems, stem) end
end
local out = {}
for i = 0, (#KEYS - 1) / 5 - 1 do
  local job, logkey, index, counts, stems = KEYS[2 + i * 5], KEYS[3 + i * 5], KEYS[4 + i * 5], KEYS[5 + i * 5],
    KEYS[6 + i * 5]
  local ref, id = ARGV[1 + i * 2], ARGV[2 + i * 2]
  local j = redis.call('HMGET', job, 'status', 'aidx', 'n:PENDING', 'n:RUNNING', 'ended', 'acount', 'anext', 'askip')
  local status = j[1]
  if not status then
    redis.call('ZREM', KEYS[1], ref)
    redis.call('ZREM', index, id)
    out[#out + 1] = -1
  elseif status == 'ARRAY' then
    if tonumber(j[3] or '0') > 0 or tonumber(j[4] or '0') > 0 then
      out[#out + 1] = 0
    else
      if j[5] and j[5] ~= '' then  -- its tasks never created are counted in their status until now
        count(counts, j[5], -(tonumber(j[6]) - tonumber(j[7]) - tonumber(j[8])))
      end
      redis.call('DEL', job)
      job_changed(counts, ref, 'DELETED')
      unstem(stems, id)
      redis.call('ZREM', index, id)
      redis.call('ZREM', KEYS[1], ref)
      out[#out + 1] = 1
    end
  elseif status == 'SUCCEEDED' or status == 'FAILED' or status == 'STOPPED' then
    redis.call('DEL', job, logkey)
    count(counts, status, -1)
    job_changed(counts, ref, 'DELETED')
    if not j[2] then unstem(stems, id) end
    redis.call('ZREM', index, id)
    redis.call('ZREM', KEYS[1], ref)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
