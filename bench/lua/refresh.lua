-- POST /api/token/refresh/, each connection chaining its own refresh tokens:
-- every answer's new refresh token is the next request's (rotation on, durable).
--
-- Run with as many threads as connections (wrk -t N -c N): response() is per
-- thread, so one connection per thread keeps each chain strictly sequential.
-- wrk args (after --): TOKENS_FILE [OFFSET]; thread i starts from line OFFSET+i
-- of TOKENS_FILE (refresh tokens from fresh logins, one per line).

local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local token

function init(args)
  local want = tonumber(args[2] or "0") + id
  local line = 0
  for t in io.lines(args[1]) do
    if line == want then
      token = t
      break
    end
    line = line + 1
  end
  assert(token, "no refresh token on line " .. want .. " of " .. args[1])
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  return wrk.format(nil, nil, nil, '{"refresh":"' .. token .. '"}')
end

function response(status, headers, body)
  if status == 200 then
    token = body:match('"refresh":"([^"]+)"') or token
  end
end
