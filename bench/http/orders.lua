-- POST /v1/orders with a new order id every request; a share of them for customers never seen before.
-- wrk ... -s orders.lua URL -- IDS_FILE API_KEY RUN_TAG NEW_CUSTOMER_SHARE
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local thread_count = 0
function setup(thread)
  thread:set("thread_number", thread_count)
  thread_count = thread_count + 1
end

local ids = {}
local run_tag, new_share
local counter = 0
local skus = { { "TOP-101", "tops", "30.00" }, { "SHO-102", "shoes", "40.00" }, { "ACC-103", "accessories", "12.50" } }

function init(args)
  for line in io.lines(args[1]) do
    ids[#ids + 1] = line
  end
  wrk.headers["X-API-Key"] = args[2]
  wrk.headers["Content-Type"] = "application/json"
  run_tag = args[3]
  new_share = tonumber(args[4])
  math.randomseed(os.time() + 7919 * thread_number)
end

function request()
  counter = counter + 1
  local unique = run_tag .. "-" .. thread_number .. "-" .. counter
  local customer
  if math.random() < new_share then
    customer = "bench-c-" .. unique
  else
    customer = ids[math.random(#ids)]
  end
  local sku = skus[counter % 3 + 1]
  local quantity = 1 + counter % 2
  local total = string.format("%.2f", quantity * tonumber(sku[3]))
  local body = string.format(
    '{"order_id": "bench-o-%s", "customer_id": "%s", "placed_at": "%s", "total": "%s", "currency": "USD", ' ..
    '"channel": "web", "items": [{"sku": "%s", "category": "%s", "quantity": %d, "unit_price": "%s"}]}',
    unique, customer, os.date("!%Y-%m-%dT%H:%M:%SZ"), total, sku[1], sku[2], quantity, sku[3])
  return wrk.format("POST", "/v1/orders", nil, body)
end
