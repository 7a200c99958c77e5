-- refund.lua: gives back what decide.lua committed for a call that a limit
-- on another Redis Cluster slot refused. Each slot decides its part of a
-- call atomically; when one part refuses, the parts that committed are
-- refunded here, so a refused call consumes none of its limits (a call
-- decided in between may have seen the units as used). A script, for the
-- same reasons as decide.lua: each key is read and rewritten atomically.
--
-- KEYS     the keys to refund (one slot).
-- ARGV[1]  the time decide.lua decided at on this node (µs), as it
--          returned it: the window or log entry the units went to.
-- ARGV[2]  a MessagePack array, four numbers per key in KEYS order: the
--          algorithm (as decide.lua numbers a definition's), the period (µs), the emission
--          interval (µs, gcra) and the units to give back.
-- Returns { the number of keys changed }.
--
-- Fixed window and sliding counter give the units back to the window they
-- went to (a sliding counter's window may have become the previous one);
-- gcra moves its arrival time back; the sliding log takes the units out of
-- the entry that holds them (the first at or after that time: later
-- admissions merged into it) and lowers the running totals of the entries
-- after it. SET ... KEEPTTL keeps each key's expiry (Redis 6 and later).

local function int(n)
  return string.format('%d', n)
end

-- The algorithms' numbers and window_of come from windows.lua, in front.


local now = tonumber(ARGV[1])
local v = cmsgpack.unpack(ARGV[2])
local changed = 0

for ki = 1, #KEYS do
  local key = KEYS[ki]
  local algorithm, period, emission, cost = v[4 * ki - 3], v[4 * ki - 2], v[4 * ki - 1], v[4 * ki]
  local window = now - now % period
  if algorithm == FIXED_WINDOW or algorithm >= CALENDAR_DAY then
    window = window_of(algorithm, now, period)
    local st = redis.call('GET', key)
    local w, c = string.match(st or '', '^(%d+):(%d+)$')
    if tonumber(w) == window then
      redis.call('SET', key, w .. ':' .. int(math.max(0, tonumber(c) - cost)), 'KEEPTTL')
      changed = changed + 1
    end
  elseif algorithm == SLIDING_COUNTER then
    local st = redis.call('GET', key)
    local w, c, p = string.match(st or '', '^(%d+):(%d+):(%d+)$')
    w, c, p = tonumber(w), tonumber(c), tonumber(p)
    if w == window then
      c = math.max(0, c - cost)
    elseif w == window + period then
      p = math.max(0, p - cost)
    end
    if w == window or w == window + period then
      redis.call('SET', key, int(w) .. ':' .. int(c) .. ':' .. int(p), 'KEEPTTL')
      changed = changed + 1
    end
  elseif algorithm == SLIDING_LOG then
    -- The entries at or after `now`, oldest first, read back from the
    -- newest 64 at a time: the oldest of them holds the units.
    local total = redis.call('ZCARD', key)
    local tail, off, found = {}, 0, false
    while not found and off < total do
      local chunk = redis.call('ZRANGE', key, -64 - off, -1 - off, 'WITHSCORES')
      for i = #chunk - 1, 1, -2 do
        if tonumber(string.match(chunk[i], ':(%d+)$')) < now then
          found = true
          break
        end
        tail[#tail + 1] = { chunk[i], tonumber(chunk[i + 1]) }
      end
      off = off + 64
    end
    if #tail > 0 then
      -- tail is newest first: the last holds the units.
      local member = tail[#tail][1]
      local held = tonumber(string.match(member, '^%d+:(%d+):'))
      local back = math.min(held, cost)
      for i = #tail, 1, -1 do
        local m, cum = tail[i][1], tail[i][2]
        local units, t = string.match(m, '^%d+:(%d+):(%d+)$')
        units = tonumber(units)
        if i == #tail then
          units = units - back
        end
        redis.call('ZREM', key, m)
        if units > 0 then
          redis.call('ZADD', key, cum - back, int(cum - back) .. ':' .. int(units) .. ':' .. t)
        end
      end
      changed = changed + 1
    end
  else -- GCRA
    local tat = tonumber(redis.call('GET', key))
    if tat then
      redis.call('SET', key, int(math.max(0, tat - emission * cost)), 'KEEPTTL')
      changed = changed + 1
    end
  end
end
return { changed }
