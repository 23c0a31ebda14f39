-- Claim the oldest waiting jobs across some ready shapes for one placement round.
-- Claimed jobs leave their shape's queue for poolq:claimed with a lease; a worker
-- that dies holding them loses the lease and the sweep puts them back in line.
--
-- KEYS: 1 shapes:ready, 2 claimed, 3.. the queues of the shapes named in ARGV
-- ARGV: 1 max jobs, 2 lease ms, 3.. shape sigs (same order as their queues)
-- Returns a flat list: ref, sig, seq, ref, sig, seq, ... oldest first.
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local candidates = {}
for i = 3, #KEYS do
  local head = redis.call('ZRANGE', KEYS[i], 0, limit - 1, 'WITHSCORES')
  for j = 1, #head, 2 do
    candidates[#candidates + 1] = {head[j], ARGV[i], tonumber(head[j + 1]), KEYS[i]}
  end
end
table.sort(candidates, function(a, b) return a[3] < b[3] end)
local out = {}
for n = 1, math.min(limit, #candidates) do
  local c = candidates[n]
  redis.call('ZREM', c[4], c[1])
  redis.call('ZADD', KEYS[2], expires, c[1])
  out[#out + 1] = c[1]
  out[#out + 1] = c[2]
  out[#out + 1] = c[3]
end
for i = 3, #KEYS do
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
  else
    redis.call('ZADD', KEYS[1], 'XX', head[2], ARGV[i])
  end
end
return out
