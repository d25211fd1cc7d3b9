-- POST /api/weixin/login/ with a different code on every request.
--
-- wrk args (after --): MODE TAG [POPULATION]
--   new        code "<TAG>u<thread>_<n>.x": a name never seen before, so every
--              request creates a user (durably) under the mock or mock_wechat.
--   returning  code "s<random 0..POPULATION-1>.<TAG><thread>_<n>": an existing
--              user (bench/run.sh fills them in with examples/populate.rs), with a
--              code never used before.
-- TAG must differ between runs against one data directory.

local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local mode, tag, population
local n = 0

function init(args)
  mode = args[1] or "new"
  tag = args[2] or "t"
  population = tonumber(args[3] or "1000")
  math.randomseed(os.time() + id * 7919)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n + 1
  local code
  if mode == "new" then
    code = tag .. "u" .. id .. "_" .. n .. ".x"
  else
    code = "s" .. math.random(0, population - 1) .. "." .. tag .. id .. "_" .. n
  end
  return wrk.format(nil, nil, nil, '{"code":"' .. code .. '"}')
end
