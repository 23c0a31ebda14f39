-- Claim waiting jobs for one placement round. Tenants take turns: the oldest job of
-- each tenant, then each tenant's next, and so on, so one tenant's backlog cannot
-- starve another's jobs. Claimed jobs leave their shape's queue for poolq:claimed
-- with a lease; a worker that dies holding them loses the lease and the sweep puts
-- them back in line.
--
-- KEYS: 1 shapes:ready, 2 claimed, 3 shapes:idle, 4.. the queues of the shapes named in ARGV
-- ARGV: 1 max jobs, 2 lease ms, then the m shapes' sigs (in the order of their
--       queues), then the m shapes' tenants (same order)
-- Returns a flat list: ref, sig, seq, ref, sig, seq, ... in the order to place them.
local limit = tonumber(ARGV[1])
local m = #KEYS - 3
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[2])
local per_tenant, tenants = {}, {}
for i = 4, #KEYS do
  local tenant = ARGV[m + i - 1]
  if not per_tenant[tenant] then
    per_tenant[tenant] = {}
    tenants[#tenants + 1] = tenant
  end
  local list = per_tenant[tenant]
  local head = redis.call('ZRANGE', KEYS[i], 0, limit - 1, 'WITHSCORES')
  for j = 1, #head, 2 do
    list[#list + 1] = {head[j], ARGV[i - 1], tonumber(head[j + 1]), KEYS[i]}
  end
end
for _, tenant in ipairs(tenants) do
  table.sort(per_tenant[tenant], function(a, b) return a[3] < b[3] end)
end
local function oldest(tenant)
  local list = per_tenant[tenant]
  return #list > 0 and list[1][3] or math.huge
end
table.sort(tenants, function(a, b) return oldest(a) < oldest(b) end)
local out, taken, turn = {}, 0, 1
while taken < limit do
  local any = false
  for _, tenant in ipairs(tenants) do
    local c = per_tenant[tenant][turn]
    if c and taken < limit then
      any = true
      taken = taken + 1
      redis.call('ZREM', c[4], c[1])
      redis.call('ZADD', KEYS[2], expires, c[1])
      out[#out + 1] = c[1]
      out[#out + 1] = c[2]
      out[#out + 1] = c[3]
    end
  end
  if not any then break end
  turn = turn + 1
end
for i = 4, #KEYS do
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i - 1])
    redis.call('ZADD', KEYS[3], now, ARGV[i - 1])  -- forgotten after a while: shapes.lua
  else
    redis.call('ZADD', KEYS[1], 'XX', head[2], ARGV[i - 1])
  end
end
return out
