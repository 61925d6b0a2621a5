"""Every server counter in one object (`ServerMetrics`), and `GET /metrics` in the Prometheus text
exposition format (version 0.0.4).

The scheduler, the detokenizer and the API report into it (`count`, `add_host_time`,
`observe_job`, `count_status`); /metrics and /health read it.

Written out here rather than through prometheus_client (no extra runtime dependency; the tests
parse the output with prometheus_client's parser). Requests are counted by HTTP status by a pure
ASGI middleware (Starlette's BaseHTTPMiddleware would wrap streaming responses and hide client
disconnects); latencies are observed when a request's rows have all finished.
"""

from __future__ import annotations

import bisect
import collections
import threading
from typing import Any

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count."""

    def __init__(self, buckets: tuple):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list:
        out, total = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


_COUNTERS = (  # name, HELP: the counters /metrics shows (all of `counts`)
    ("cancelled", "Requests whose client left before the end."),
    ("timed_out", "Requests that passed their deadline."),
    ("rejected_queue_full", "Requests refused with HTTP 429 (queue full)."),
    ("completed", "Requests answered in full."),
    ("tokens", "Tokens generated (all rows)."),
    ("prefill_tokens", "Padded prompt tokens prefilled."),
    ("steps", "Decode steps dispatched."),
    ("failed_steps", "Decode steps that raised (their requests got HTTP 500)."),
)


class ServerMetrics:
    """Counters, gauges and histograms of one server (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # HTTP status -> completion requests answered
        self.counts = collections.Counter()  # see _COUNTERS; also "accepted", "rows"
        self.host = collections.defaultdict(lambda: [0.0, 0])  # thread -> [seconds, tokens]
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self._gauges = {"queued": lambda: 0, "running": lambda: 0, "slots": 0}
        self.compiles_at_start = 0

    def watch(self, *, queued, running, slots: int) -> None:
        """Where the gauges are read: the scheduler's queue and slots."""
        self._gauges = {"queued": queued, "running": running, "slots": slots}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def add_host_time(self, thread: str, seconds: float, tokens: int) -> None:
        """CPU seconds a host thread spent on `tokens` tokens (its own work, not the device's)."""
        with self._lock:
            h = self.host[thread]
            h[0] += seconds
            h[1] += tokens

    def count_status(self, status: int) -> None:
        with self._lock:
            self.requests[int(status)] += 1

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def observe_job(self, job: Any) -> None:
        """A finished request: time to its first token, and each row's time per output token."""
        firsts = [r.first_at for r in job.rows if r.first_at is not None]
        with self._lock:
            self.counts["completed"] += 1
            if firsts:
                self.ttft.observe(max(0.0, min(firsts) - job.arrived))
            for r in job.rows:
                if r.first_at is not None and len(r.new_ids) > 1:
                    self.tpot.observe((r.last_at - r.first_at) / (len(r.new_ids) - 1))

    def render(self, *, compilations_after_warmup: int) -> str:
        """The exposition text: metric families with HELP and TYPE lines."""
        g = self._gauges
        with self._lock:
            st = dict(self.counts)
            host = {k: tuple(v) for k, v in self.host.items()}
            fams = [("gptjax_requests", "counter", "Completion requests answered, by HTTP status.",
                     [f'gptjax_requests_total{{code="{c}"}} {n}'
                      for c, n in sorted(self.requests.items())])]
            for name, help_ in _COUNTERS:
                metric = {"cancelled": "gptjax_requests_cancelled",
                          "timed_out": "gptjax_requests_timed_out",
                          "tokens": "gptjax_generated_tokens"}.get(name, f"gptjax_{name}")
                fams.append((metric, "counter", help_, [f"{metric}_total {st.get(name, 0)}"]))
            hist = [
                ("gptjax_time_to_first_token_seconds", "histogram",
                 "From a request's arrival to its first generated token.",
                 self.ttft.lines("gptjax_time_to_first_token_seconds")),
                ("gptjax_time_per_output_token_seconds", "histogram",
                 "Per row: (last token time - first token time) / (tokens - 1).",
                 self.tpot.lines("gptjax_time_per_output_token_seconds")),
            ]
        fams += [
            ("gptjax_host_seconds", "counter",
             "CPU seconds of the host threads' own work (scheduler bookkeeping, detokenizer).",
             [f'gptjax_host_seconds_total{{thread="{t}"}} {s!r}' for t, (s, _) in
              sorted(host.items())]),
            ("gptjax_queue_length", "gauge", "Requests waiting for a decode slot.",
             [f"gptjax_queue_length {g['queued']()}"]),
            ("gptjax_running_slots", "gauge", "Decode slots holding a row.",
             [f"gptjax_running_slots {g['running']()}"]),
            ("gptjax_decode_slots", "gauge", "Decode slots (rows decoded together at most).",
             [f"gptjax_decode_slots {g['slots']}"]),
            ("gptjax_compilations_after_warmup", "counter",
             "XLA compilations since warm-up (0 while serving: every shape is precompiled).",
             [f"gptjax_compilations_after_warmup_total {compilations_after_warmup}"]),
        ] + hist
        out = []
        for name, kind, help_, lines in fams:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"] + lines
        return "\n".join(out) + "\n"


class StatusCounter:
    """ASGI middleware: counts the HTTP status of every response to `path` into `metrics`."""

    def __init__(self, app, metrics: ServerMetrics, path: str = "/v1/completions"):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_status(message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)
