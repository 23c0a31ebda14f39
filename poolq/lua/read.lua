-- Read job records: each job's hash and, for the jobs that wait for placement, their
-- shapes' hashes (the attempts and reasons placement keeps there, store.py `_waiting`).
-- One round trip for a poll, or for all the polls of an API process that came together.
--
-- KEYS: the job hashes
-- ARGV: 1 the shape key prefix
-- Returns: each job's fields, flat (empty: no such job), then one more list:
--          sig, shape fields (flat), … once for each shape of a waiting job
local out, shapes, seen = {}, {}, {}
for i, key in ipairs(KEYS) do
  local job = redis.call('HGETALL', key)
  local f = {}
  for n = 1, #job, 2 do f[job[n]] = job[n + 1] end
  local sig = f.shape or ''
  if f.status == 'PENDING' and (f.node or '') == '' and (f.attempts or '') == '' and sig ~= '' and not seen[sig] then
    seen[sig] = true
    shapes[#shapes + 1] = sig
    shapes[#shapes + 1] = redis.call('HGETALL', ARGV[1] .. sig)
  end
  out[i] = job
end
out[#KEYS + 1] = shapes
return out
