-- decide.lua: decides a batch of calls in one round trip. For each call,
-- in order, it decides every limit of the call and commits the new states
-- only if no limit outside shadow mode rejects (a refused call consumes
-- nothing); a later call of the batch sees the earlier ones' commits, as if
-- they had come one by one. Each algorithm mirrors the pure code in
-- proxy/src/limit/algorithm.rs line by line; the behaviour table in
-- proxy/src/limit/behaviour.rs runs against both.
--
-- KEYS     the state keys the batch touches, each once. In Redis Cluster
--          all keys of one script share a slot (tollgate batches per slot;
--          each key is its own hash tag, so the limits of one call may live
--          on several slots: each slot decides its part). A key belongs to
--          one algorithm (tollgate puts the algorithm in the key).
-- ARGV[1]  now in microseconds, or "" to use Redis TIME (one clock for every
--          replica; tests pass a time to step through a case).
-- ARGV[2]  every number below, as one MessagePack array of unsigned
--          integers (one C call turns it into a Lua table; a separate
--          argument per number would cost Redis an object, a Lua string
--          and a tonumber each):
--          D, the number of limit definitions, then seven numbers each:
--          algorithm  1 fixed window, 2 sliding window counter,
--                     3 sliding window log, 4 gcra, 5 6 7 a fixed
--                     window that is a calendar day, week or month
--          limit      units per period
--          period     microseconds
--          capacity   gcra: the burst; others: the limit
--          emission   gcra: microseconds per unit (period / limit, >= 1)
--          ttl        microseconds after which an untouched state is moot
--          flags      1 for shadow (decided and reported, never blocks
--                     the commit), plus 2 for a peek (decided, never
--                     written: a limit charged after the call, asked
--                     before it) or 4 for a charge (taken whether or not
--                     it fits, never refused: a call's cost once it ended)
--          then, per key in KEYS order, its algorithm (as above, a
--          calendar window's as 1: its state is a fixed window's);
--          then the number of calls, and per call: the number of its
--          limits, whether it wants the figures of limits that allow it
--          (1/0), and for each limit three numbers: its key (1..#KEYS), its
--          definition (1..D) and the units this call takes.
-- Returns the time it decided at (µs: refund.lua takes it back for a call
-- that another slot refused), then, per call in order: -1 when every limit
-- allows it and its figures are not wanted; else, per limit in order, five
-- integers: allowed (1/0), limit, remaining, reset (µs until the quota is
-- whole again), retry after (µs, 0 if allowed).
--
-- State per key: fixed window a string "window start:count"; sliding
-- counter "window start:current:previous"; sliding log a sorted set with
-- one member per admission, "cum:units:time", scored by cum, the units
-- admitted so far with it (units only grow with time, so the lowest
-- scores are the oldest; the units in the window are the newest cum less
-- the oldest's, plus its units; admissions within period / 1024 of the
-- newest are merged into it, as in algorithm.rs); gcra a string holding the
-- theoretical arrival time. The string states of a batch are read with one
-- MGET, parsed once into numbers, and each written once at the end with one
-- SET (a Redis call from Lua costs more than the decisions). Redis (5 and
-- later) hands
-- numbers to commands exactly; strings made of numbers (states, the log's
-- members) are built with int(), because Lua's own number printing would
-- use exponent form.

if redis.replicate_commands then
  redis.replicate_commands()
end

-- The algorithms' numbers and window_of come from windows.lua, in front.


local function int(n)
  return string.format('%d', n)
end

-- A sliding log's running total above this is rebased (see the commits).
local REBASE = 2 ^ 50

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

local v = cmsgpack.unpack(ARGV[2])
local defs = {}
local a = 2
for d = 1, v[1] do
  local flags = v[a + 6]
  defs[d] = { v[a], v[a + 1], v[a + 2], v[a + 3], v[a + 4], v[a + 5], flags % 2 == 1, flags % 4 >= 2, flags >= 4 }
  a = a + 7
end

local alg = {}
for ki = 1, #KEYS do
  alg[ki] = v[a + ki - 1]
end
a = a + #KEYS

local calls = v[a]
a = a + 1

-- The string states (every algorithm but the log) of the whole batch, read
-- with one MGET and held as numbers while the batch is decided, by key
-- index: st_time (the window's start; gcra: the theoretical arrival time),
-- st_count (the window's count) and st_previous (the sliding counter's
-- previous window). Calls see the states as
-- the earlier calls of the batch left them.
local st_time, st_count, st_previous = {}, {}, {}
do
  local wanted = {}
  for ki = 1, #KEYS do
    if alg[ki] ~= SLIDING_LOG then
      wanted[#wanted + 1] = ki
    end
  end
  for from = 1, #wanted, 1000 do
    local chunk = {}
    for i = from, math.min(from + 999, #wanted) do
      chunk[#chunk + 1] = KEYS[wanted[i]]
    end
    local values = redis.call('MGET', unpack(chunk))
    for i = 1, #chunk do
      local st, ki = values[i], wanted[from + i - 1]
      if st then
        local algorithm = alg[ki]
        if algorithm == FIXED_WINDOW then
          local w, c = string.match(st, '^(%d+):(%d+)$')
          st_time[ki], st_count[ki] = tonumber(w), tonumber(c)
        elseif algorithm == SLIDING_COUNTER then
          local w, c, p = string.match(st, '^(%d+):(%d+):(%d+)$')
          st_time[ki], st_count[ki], st_previous[ki] = tonumber(w), tonumber(c), tonumber(p)
        else
          st_time[ki] = tonumber(st)
        end
      end
    end
  end
end

-- Writes of the call being decided, applied only if it commits: key index,
-- the state's new fields and its ttl (the log: its cost in put_count).
local put_key, put_time, put_count, put_previous, put_ttl = {}, {}, {}, {}, {}
-- Figures of the call's limits, answered unless all allow unasked.
local fig_allowed, fig_limit, fig_remaining, fig_reset, fig_retry = {}, {}, {}, {}, {}
local dirty = {}
-- The period of each sliding log key decided (its commits merge by it).
local logs = {}
local out = { now }
local n = 1

for _ = 1, calls do
  local limits = v[a]
  local details = v[a + 1] == 1
  a = a + 2
  local np = 0
  local commit = true
  local all_allowed = true
  for j = 1, limits do
    local ki = v[a]
    local def = defs[v[a + 1]]
    local cost = v[a + 2]
    a = a + 3
    local algorithm, limit, period, capacity, emission, ttl, shadow, peek, charge =
      def[1], def[2], def[3], def[4], def[5], def[6], def[7], def[8], def[9]
    local allowed, shown, remaining, reset, retry

    if algorithm == FIXED_WINDOW or algorithm >= CALENDAR_DAY then
      local window, ends = window_of(algorithm, now, period)
      local count = 0
      if st_time[ki] == window then
        count = st_count[ki]
      end
      reset = ends - now
      allowed = charge or count + cost <= limit
      if allowed then
        -- A charge past the limit fills the window, no further (algorithm.rs).
        count = math.min(count + cost, math.max(limit, count))
        if not peek then
          np = np + 1
          put_key[np], put_time[np], put_count[np], put_previous[np], put_ttl[np] = ki, window, count, 0, ttl
        end
      end
      shown = limit
      remaining = math.max(0, limit - count)
      retry = allowed and 0 or reset

    elseif algorithm == SLIDING_COUNTER then
      local window = now - now % period
      local current, previous = 0, 0
      local w = st_time[ki]
      if w == window then
        current, previous = st_count[ki], st_previous[ki]
      elseif w ~= nil and w + period == window then
        previous = st_count[ki]
      end
      local elapsed = now - window
      -- The previous window's count weighted by the share of it still in
      -- the sliding window, rounded down, as algorithm.rs does. Exact:
      -- config check keeps limit * period < 2^53, so the product and its
      -- remainder are whole doubles.
      local carried = previous * (period - elapsed)
      carried = (carried - carried % period) / period
      allowed = charge or carried + current + cost <= limit
      if allowed then
        current = math.min(current + cost, math.max(limit, current))
        if not peek then
          np = np + 1
          put_key[np], put_time[np], put_count[np], put_previous[np], put_ttl[np] = ki, window, current, previous, ttl
        end
      end
      shown = limit
      remaining = math.max(0, limit - (carried + current))
      reset = window + period - now
      if allowed then
        retry = 0
      elseif current + cost <= limit and previous > 0 then
        -- The first elapsed' whose rounded-down weight fits in room.
        local span = (limit - (current + cost) + 1) * period
        local keep = (span - span % previous) / previous
        if span % previous > 0 then
          keep = keep + 1
        end
        retry = math.max(1, period + 1 - keep - elapsed)
      elseif previous > 0 or current > 0 then
        retry = reset + period / 2
      else
        retry = reset
      end

    elseif algorithm == SLIDING_LOG then
      local key = KEYS[ki]
      logs[ki] = period
      -- Drop the entries that have left the window, oldest first, a few
      -- at a time (each entry goes once: amortised O(1) per call).
      local ftime, fcum, fcost
      while true do
        local head = redis.call('ZRANGE', key, 0, 31, 'WITHSCORES')
        local gone = 0
        for i = 1, #head, 2 do
          local c, t = string.match(head[i], '^%d+:(%d+):(%d+)$')
          t = tonumber(t)
          if t + period > now then
            ftime, fcum, fcost = t, tonumber(head[i + 1]), tonumber(c)
            break
          end
          gone = gone + 1
        end
        if gone > 0 then
          redis.call('ZREMRANGEBYRANK', key, 0, gone - 1)
        end
        if ftime or gone < 32 then
          break
        end
      end
      local used, ncum = 0, 0
      if ftime then
        ncum = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
        used = ncum - fcum + fcost
      end
      allowed = charge or used + cost <= limit
      if allowed then
        retry = 0
      elseif cost > limit then
        retry = period
      else
        -- The entry whose leaving makes room: the units after it, and
        -- this call's, fit in the limit.
        local m = redis.call('ZRANGEBYSCORE', key, int(ncum + cost - limit), '+inf', 'LIMIT', 0, 1)
        retry = tonumber(string.match(m[1], ':(%d+)$')) + period - now
      end
      if allowed then
        if not peek then
          np = np + 1
          put_key[np], put_time[np], put_count[np], put_previous[np], put_ttl[np] = ki, 0, cost, 0, ttl
        end
        used = used + cost
      end
      shown = limit
      remaining = math.max(0, limit - used)
      if ftime then
        reset = ftime + period - now
      elseif allowed then
        reset = period
      else
        reset = 0
      end

    else -- GCRA
      local tau = emission * capacity
      local tat = st_time[ki]
      if tat == nil or tat < now then
        tat = now
      end
      local new_tat = tat + emission * cost
      local allow_at = math.max(0, new_tat - tau)
      allowed = charge or (now >= allow_at and cost <= capacity)
      local kept = allowed and new_tat or tat
      if allowed and not peek then
        np = np + 1
        -- A charge past the burst owes more than the usual lifetime.
        put_key[np], put_time[np], put_count[np], put_previous[np], put_ttl[np] = ki, kept, 0, 0, math.max(ttl, kept - now)
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

    if not allowed then
      all_allowed = false
      if not shadow then
        commit = false
      end
    end
    fig_allowed[j], fig_limit[j], fig_remaining[j], fig_reset[j], fig_retry[j] = allowed and 1 or 0, shown, remaining, reset, retry
  end

  if all_allowed and not details then
    n = n + 1
    out[n] = -1
  else
    for j = 1, limits do
      out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = fig_allowed[j], fig_limit[j], fig_remaining[j], fig_reset[j], fig_retry[j]
      n = n + 5
    end
  end

  if commit then
    for i = 1, np do
      local ki = put_key[i]
      if alg[ki] == SLIDING_LOG then
        -- One entry per call, or merged into the newest when that one is
        -- less than a grain (period / 1024) older, at the later time.
        local key, cost = KEYS[ki], put_count[i]
        local grain = math.floor(logs[ki] / 1024)
        local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
        local cum, units, at = cost, cost, now
        if #last > 0 then
          local lc, lt = string.match(last[1], '^%d+:(%d+):(%d+)$')
          lc, lt = tonumber(lc), tonumber(lt)
          cum = tonumber(last[2]) + cost
          if now - lt < grain then
            redis.call('ZREM', key, last[1])
            units, at = lc + cost, math.max(lt, now)
          end
        end
        if cum >= REBASE then
          -- Keep the running totals far below 2^53 (doubles stay exact):
          -- take the oldest entry's start off every total.
          local all = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
          local base = cum - units
          if #all > 0 then
            base = tonumber(all[2]) - tonumber(string.match(all[1], '^%d+:(%d+):'))
          end
          for i = 1, #all, 2 do
            local u, t = string.match(all[i], '^%d+:(%d+):(%d+)$')
            local c = tonumber(all[i + 1]) - base
            redis.call('ZREM', key, all[i])
            redis.call('ZADD', key, c, int(c) .. ':' .. u .. ':' .. t)
          end
          cum = cum - base
        end
        redis.call('ZADD', key, cum, int(cum) .. ':' .. int(units) .. ':' .. int(at))
        redis.call('PEXPIRE', key, ttl_ms(put_ttl[i]))
      else
        st_time[ki], st_count[ki], st_previous[ki] = put_time[i], put_count[i], put_previous[i]
        dirty[ki] = put_ttl[i]
      end
    end
  end
end

for ki, ttl in pairs(dirty) do
  local algorithm, value = alg[ki]
  if algorithm == FIXED_WINDOW then
    value = int(st_time[ki]) .. ':' .. int(st_count[ki])
  elseif algorithm == SLIDING_COUNTER then
    value = int(st_time[ki]) .. ':' .. int(st_count[ki]) .. ':' .. int(st_previous[ki])
  else
    value = int(st_time[ki])
  end
  redis.call('SET', KEYS[ki], value, 'PX', ttl_ms(ttl))
end
return out
