-- Read a tenant's change feed (lib/changes.lua) after a cursor, and say when the cursor
-- is older than what the feed keeps. Read-only.
--
-- A cursor is an entry's id ("<ms>-<n>"), or '0-0' for a feed that had no entry yet. It
-- is too old when the feed's oldest entry came after it and the feed may have lost
-- entries to its cap: it holds CHANGES_KEPT of them (it is trimmed to no fewer), or
-- it has none and the cursor names an entry (a tenant is forgotten, feed and all, once
-- its last job was removed).
--
-- KEYS: 1 the feed
-- ARGV: 1 the cursor ('' for the feed's position now), 2 most entries to answer
-- Returns {0, cursor, id, status, node, ...} the entries after it (the cursor: the last
-- one's id, else the one given), {1, position} the cursor is too old (the position the
-- feed is at now, to follow once the jobs were listed again).
--! include lib/changes.lua
local function position()
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  return last[1] and last[1][1] or '0-0'
end
local cursor = ARGV[1]
if cursor == '' then return {0, position()} end
local function parse(id)
  local ms, n = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(n)
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local cms, cn = parse(cursor)
if first then
  local fms, fn = parse(first[1])
  if (cms < fms or (cms == fms and cn < fn)) and redis.call('XLEN', KEYS[1]) >= CHANGES_KEPT then
    return {1, position()}
  end
elseif cursor ~= '0-0' then
  return {1, '0-0'}  -- no feed, yet the cursor names an entry: the tenant was forgotten since
end
local out = {0, cursor}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. cursor, '+', 'COUNT', tonumber(ARGV[2]))) do
  local f = entry[2]
  local fields = {}
  for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
  out[#out + 1] = entry[1]
  out[#out + 1] = fields.id or ''
  out[#out + 1] = fields.s or ''
  out[#out + 1] = fields.n or ''
  out[2] = entry[1]
end
return out
