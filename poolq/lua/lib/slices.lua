-- Many arguments to one command, in slices of 1000 that stay well within Lua's stack
-- (an even size: a list of pairs, score and member or field and value, stays paired).
local function each_slice(list, call)
  for s = 1, #list, 1000 do call(unpack(list, s, math.min(s + 999, #list))) end
end
