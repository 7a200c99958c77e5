-- windows.lua: what decide.lua and refund.lua share, put in front of each
-- (redis/mod.rs joins them; a Redis script cannot load another): the
-- algorithms' numbers as wire.rs sends them (4 is GCRA, the last branch of
-- each script) and the window a fixed or calendar window holds `now` in.

local FIXED_WINDOW, SLIDING_COUNTER, SLIDING_LOG = 1, 2, 3

-- Calendar windows (fixed windows that are a UTC day, an ISO week from
-- Monday, or a month): the definitions' algorithm numbers; their keys hold
-- a fixed window's state.
local CALENDAR_DAY, CALENDAR_WEEK, CALENDAR_MONTH = 5, 6, 7
local DAY = 86400000000

local function idiv(a, b)
  return (a - a % b) / b
end

-- The fixed window holding now (µs of Unix time): its start and its end,
-- as algorithm.rs's Calendar::window computes them (the month from Howard
-- Hinnant's civil_from_days).
local function window_of(algorithm, now, period)
  if algorithm == FIXED_WINDOW then
    local w = now - now % period
    return w, w + period
  end
  local days = idiv(now, DAY)
  local first, len = days, 1
  if algorithm == CALENDAR_WEEK then
    first, len = days - (days + 3) % 7, 7
  elseif algorithm == CALENDAR_MONTH then
    local z = days + 719468
    local era = idiv(z, 146097)
    local doe = z - era * 146097
    local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
    local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
    local mp = idiv(5 * doy + 2, 153)
    local d = doy - idiv(153 * mp + 2, 5) + 1
    local m = mp < 10 and mp + 3 or mp - 9
    local y = yoe + era * 400 + (m <= 2 and 1 or 0)
    first = days - (d - 1)
    if m == 2 then
      len = (y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0)) and 29 or 28
    elseif m == 4 or m == 6 or m == 9 or m == 11 then
      len = 30
    else
      len = 31
    end
  end
  return first * DAY, (first + len) * DAY
end
