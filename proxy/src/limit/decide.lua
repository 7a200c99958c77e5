-- decide.lua: decides a batch of calls in one round trip. For each call,
-- in order, it decides every limit of the call and commits the new states
-- only if no limit outside shadow mode rejects (a refused call consumes
-- nothing); a later call of the batch sees the earlier ones' commits, as if
-- they had come one by one. Each algorithm mirrors the pure code in
-- proxy/src/limit/algorithm.rs line by line; the behaviour table in
-- proxy/src/limit/behaviour.rs runs against both.
--
-- KEYS     the state keys of every limit of every call, in order. In Redis
--          Cluster all keys of one script share a slot (tollgate batches
--          per slot and gives the limits of one route one hash tag).
-- ARGV[1]  now in microseconds, or "" to use Redis TIME (one clock for every
--          replica; tests pass a time to step through a case).
-- ARGV[2]  D, the number of limit definitions, then seven numbers each:
--          algorithm  1 fixed window, 2 sliding window counter,
--                     3 sliding window log, 4 gcra
--          limit      units per period
--          period     microseconds
--          capacity   gcra: the burst; others: the limit
--          emission   gcra: microseconds per unit (period / limit, >= 1)
--          ttl        microseconds after which an untouched state is moot
--          shadow     1: decided and reported, never blocks the commit
-- Then     the number of calls, and per call: the number of its limits,
--          whether it wants the figures of limits that allow it (1/0), and
--          for each limit (its key is the next of KEYS) two numbers: its
--          definition (1..D) and the units this call takes.
-- Returns, per limit, calls and limits in order: -1 for a limit that
-- allows the call when its figures are not wanted; else five integers:
-- allowed (1/0), limit, remaining, reset (µs until the quota is whole
-- again), retry after (µs, 0 if allowed).
--
-- State per key: fixed window a string "window start:count"; sliding
-- counter "window start:current:previous"; sliding log a sorted set with
-- one member per unit, scored by its time; gcra a string holding the
-- theoretical arrival time. The string states of a batch are read with one
-- MGET and each written once, with one SET (a Redis call from Lua costs more
-- than parsing a short string). Redis (5 and later) hands
-- numbers to commands exactly; strings made of numbers (states, the log's
-- members) are built with int(), because Lua's own number printing would
-- use exponent form.

if redis.replicate_commands then
  redis.replicate_commands()
end

local function int(n)
  return string.format('%d', n)
end

local function ttl_ms(micros)
  return math.max(1, math.ceil(micros / 1000))
end

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local defs = {}
local a = 3
for d = 1, tonumber(ARGV[2]) do
  defs[d] = {
    tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), ARGV[a + 6] == '1',
  }
  a = a + 7
end

local calls = tonumber(ARGV[a])
a = a + 1

-- The string states (every algorithm but the log) of the whole batch are
-- read with one MGET and written once per key at the end: a Redis call
-- from Lua costs more than the decision. Calls see the states as the
-- earlier calls of the batch left them.
local state = {}
local dirty = {}
do
  local wanted, seen = {}, {}
  local b, kk = a, 1
  for _ = 1, calls do
    local limits = tonumber(ARGV[b])
    b = b + 2
    for _ = 1, limits do
      local key = KEYS[kk]
      kk = kk + 1
      if defs[tonumber(ARGV[b])][1] ~= 3 and not seen[key] then
        seen[key] = true
        wanted[#wanted + 1] = key
      end
      b = b + 2
    end
  end
  for from = 1, #wanted, 1000 do
    local chunk = {unpack(wanted, from, math.min(from + 999, #wanted))}
    local values = redis.call('MGET', unpack(chunk))
    for i, key in ipairs(chunk) do
      state[key] = values[i]
    end
  end
end

local out = {}
local n = 0
local k = 1

for _ = 1, calls do
  local limits = tonumber(ARGV[a])
  local details = ARGV[a + 1] == '1'
  a = a + 2
  local writes = {}
  local commit = true
  for _ = 1, limits do
    local key = KEYS[k]
    k = k + 1
    local def = defs[tonumber(ARGV[a])]
    local cost = tonumber(ARGV[a + 1])
    a = a + 2
    local algorithm, limit, period, capacity, emission, ttl, shadow =
      def[1], def[2], def[3], def[4], def[5], def[6], def[7]
    local allowed, shown, remaining, reset, retry, write

    if algorithm == 1 then
      local st = state[key]
      local window = now - now % period
      local count = 0
      if st then
        local w, c = string.match(st, '^(%d+):(%d+)$')
        if tonumber(w) == window then
          count = tonumber(c)
        end
      end
      reset = window + period - now
      allowed = count + cost <= limit
      if allowed then
        count = count + cost
        write = {key, int(window) .. ':' .. int(count), ttl_ms(ttl)}
      end
      shown = limit
      remaining = math.max(0, limit - count)
      retry = allowed and 0 or reset

    elseif algorithm == 2 then
      local st = state[key]
      local window = now - now % period
      local current, previous = 0, 0
      if st then
        local sw, sc, sp = string.match(st, '^(%d+):(%d+):(%d+)$')
        local w = tonumber(sw)
        if w == window then
          current = tonumber(sc)
          previous = tonumber(sp)
        elseif w ~= nil and w + period == window then
          previous = tonumber(sc)
        end
      end
      local elapsed = now - window
      -- previous * (period - elapsed) / period + current, scaled by period so
      -- the comparison is exact (config check keeps limit * period < 2^53).
      local function scaled(c)
        return previous * (period - elapsed) + c * period
      end
      local cap = limit * period
      allowed = scaled(current + cost) <= cap
      if allowed then
        current = current + cost
        write = {key, int(window) .. ':' .. int(current) .. ':' .. int(previous), ttl_ms(ttl)}
      end
      shown = limit
      remaining = math.floor(math.max(0, cap - scaled(current)) / period)
      reset = window + period - now
      if allowed then
        retry = 0
      elseif current + cost <= limit and previous > 0 then
        local room = limit - (current + cost)
        local keep = math.floor(room * period / previous)
        retry = math.max(1, period - keep - elapsed)
      elseif previous > 0 or current > 0 then
        retry = reset + period / 2
      else
        retry = reset
      end

    elseif algorithm == 3 then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
      local used = redis.call('ZCARD', key)
      allowed = used + cost <= limit
      if allowed then
        retry = 0
      elseif cost > limit then
        retry = period
      else
        -- The member whose leaving makes room: enough of the oldest units
        -- must slide out of the window.
        local e = redis.call('ZRANGE', key, used + cost - limit - 1, used + cost - limit - 1, 'WITHSCORES')
        retry = tonumber(e[2]) + period - now
      end
      local oldest
      if used > 0 then
        oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
      elseif allowed then
        oldest = now
      end
      if allowed then
        -- Members are unique: at one instant the count only grows.
        write = function()
          local args = {}
          for j = 1, cost do
            args[#args + 1] = now
            args[#args + 1] = int(now) .. ':' .. int(used + j)
            if #args >= 2000 then
              redis.call('ZADD', key, unpack(args))
              args = {}
            end
          end
          if #args > 0 then
            redis.call('ZADD', key, unpack(args))
          end
          redis.call('PEXPIRE', key, ttl_ms(ttl))
        end
        used = used + cost
      end
      shown = limit
      remaining = math.max(0, limit - used)
      reset = oldest and (oldest + period - now) or 0

    else
      local tau = emission * capacity
      local tat = tonumber(state[key])
      if tat == nil or tat < now then
        tat = now
      end
      local new_tat = tat + emission * cost
      local allow_at = math.max(0, new_tat - tau)
      allowed = now >= allow_at and cost <= capacity
      local kept = allowed and new_tat or tat
      if allowed then
        write = {key, int(kept), ttl_ms(ttl)}
      end
      shown = capacity
      remaining = math.floor(math.max(0, now + tau - kept) / emission)
      reset = kept - now
      if allowed then
        retry = 0
      elseif cost > capacity then
        retry = tau
      else
        retry = allow_at - now
      end
    end

    if not allowed and not shadow then
      commit = false
    end
    if write then
      writes[#writes + 1] = write
    end
    if allowed and not details then
      out[n + 1] = -1
      n = n + 1
    else
      out[n + 1] = allowed and 1 or 0
      out[n + 2] = shown
      out[n + 3] = remaining
      out[n + 4] = reset
      out[n + 5] = retry
      n = n + 5
    end
  end
  if commit then
    for _, write in ipairs(writes) do
      if type(write) == 'table' then
        state[write[1]] = write[2]
        dirty[write[1]] = write[3]
      else
        write()
      end
    end
  end
end

for key, px in pairs(dirty) do
  redis.call('SET', key, state[key], 'PX', px)
end
return out
