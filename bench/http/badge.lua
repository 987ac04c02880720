-- GET /v1/customers/{id}/tier for a random existing customer.
-- wrk ... -s badge.lua URL -- IDS_FILE API_KEY
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local ids = {}

function init(args)
  for line in io.lines(args[1]) do
    ids[#ids + 1] = line
  end
  wrk.headers["X-API-Key"] = args[2]
  -- Each thread draws its own sequence: seeded from its address, not only the clock shared by all threads.
  math.randomseed(os.time() + tonumber(tostring(ids):match("0x(%x+)") or "0", 16) % 100000)
end

function request()
  return wrk.format("GET", "/v1/customers/" .. ids[math.random(#ids)] .. "/tier")
end
