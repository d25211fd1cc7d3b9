-- Appended to every scenario script by bench/run.sh: at the end of a run, one
-- machine-readable line with the totals (wrk's own text is kept in the .out file).
-- Latencies are in microseconds; errors are non-2xx/3xx statuses and socket errors.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d status_errors=%d socket_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end
