-- Accrue each tenant's use of CPU for fair share (docs/scheduling.md): its decayed
-- CPU-seconds, U = U * 2^(-dt / half-life) + reserved CPU * dt, so that what a tenant
-- used a half-life ago counts half, and a tenant that used nothing for a while has
-- nothing left to be charged for (no credit is banked either: use only ever costs).
-- claim.lua gives turns to the tenant with the least U / weight first.
--
-- Safe to run twice: time since the last accrual ("@at") is what is charged, so a run
-- right after another charges next to nothing.
--
-- KEYS: 1 fairshare, 2.. the tenants' usage hashes
-- ARGV: 1 half-life ms, then the tenants (in the order of their usage hashes)
-- Returns how many tenants have use left.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local half_life = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], '@at') or '')
redis.call('HSET', KEYS[1], '@at', now)
if not last or now <= last then return 0 end
local dt = math.min(now - last, 10 * half_life)
local decay = 2 ^ (-dt / half_life)
local left = 0
for i = 2, #KEYS do
  local tenant = ARGV[i]
  local used = tonumber(redis.call('HGET', KEYS[1], tenant) or '0') * decay
    + tonumber(redis.call('HGET', KEYS[i], 'CPU') or '0') * dt / 1000
  if used < 1 then
    redis.call('HDEL', KEYS[1], tenant)
  else
    redis.call('HSET', KEYS[1], tenant, string.format('%.1f', used))
    left = left + 1
  end
end
return left
