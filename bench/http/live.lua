-- GET /health/live, the same server's floor for a request that touches nothing.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
