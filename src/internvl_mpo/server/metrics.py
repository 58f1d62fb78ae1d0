"""The server's Prometheus metrics: the counters, gauges and histograms the generation worker updates, and their text
(exposition format 0.0.4), under vLLM's names and buckets so that dashboards made for vLLM read them. Thread-safe:
the worker thread writes them, the event loop reads them."""

import bisect
import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus's text exposition format

FINISH_REASONS = ("stop", "length", "abort", "error")  # vLLM's finished_reason values that can happen here
# vLLM's buckets, in seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class Histogram:
    """Observations counted in buckets (each bucket the values at most its bound, the last one +Inf) and summed."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str, labels: str) -> list[str]:
        """The `_bucket` lines (cumulative counts), then `_count` and `_sum`."""
        lines, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            total += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
        return lines + [f"{name}_count{{{labels}}} {total}", f"{name}_sum{{{labels}}} {self.sum!r}"]


class Metrics:
    """What the generation worker counts, one row (one choice of a request) at a time, as vLLM's engine counts its
    requests: rows running and waiting, prompt tokens prefilled, tokens generated, rows finished by reason, and the
    time to a row's first token, between its tokens and to its end."""

    def __init__(self):
        self._lock = threading.Lock()
        self.running = self.waiting = 0
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)

    def rows(self, running: int, waiting: int) -> None:
        with self._lock:
            self.running, self.waiting = running, waiting

    def prefilled(self, prompt_tokens: int, seconds: float) -> None:
        """A row's prompt was prefilled, its first token made `seconds` after it was submitted."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.ttft.observe(seconds)

    def generated(self, since_last: float | None) -> None:
        """A token was generated, `since_last` seconds after the row's previous one (None for its first)."""
        with self._lock:
            self.generation_tokens += 1
            if since_last is not None:
                self.tpot.observe(since_last)

    def ended(self, reason: str, seconds: float) -> None:
        """A row finished (`reason`: one of FINISH_REASONS) `seconds` after it was submitted."""
        with self._lock:
            self.finished[reason] += 1
            self.e2e.observe(seconds)

    def text(self, model_name: str) -> str:
        """The exposition text, every sample labelled with `model_name` as vLLM labels its own."""
        label = 'model_name="' + model_name.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") + '"'
        families = []

        def family(name: str, kind: str, about: str, samples: list[str]) -> None:
            families.append("\n".join([f"# HELP {name} {about}", f"# TYPE {name} {kind}", *samples]))

        with self._lock:
            family("vllm:num_requests_running", "gauge", "Requests (choices) being decoded in the batch.",
                   [f"vllm:num_requests_running{{{label}}} {self.running}"])
            family("vllm:num_requests_waiting", "gauge", "Requests (choices) waiting for a row of the batch.",
                   [f"vllm:num_requests_waiting{{{label}}} {self.waiting}"])
            family("vllm:prompt_tokens_total", "counter", "Prompt tokens prefilled (each choice's).",
                   [f"vllm:prompt_tokens_total{{{label}}} {self.prompt_tokens}"])
            family("vllm:generation_tokens_total", "counter", "Tokens generated.",
                   [f"vllm:generation_tokens_total{{{label}}} {self.generation_tokens}"])
            family("vllm:request_success_total", "counter", "Requests (choices) finished, by finish reason.",
                   [f'vllm:request_success_total{{{label},finished_reason="{reason}"}} {count}'
                    for reason, count in self.finished.items()])
            for name, what, histogram in (("time_to_first_token", "time to first token", self.ttft),
                                          ("time_per_output_token", "time per output token after the first",
                                           self.tpot),
                                          ("e2e_request_latency", "end-to-end request latency", self.e2e)):
                family(f"vllm:{name}_seconds", "histogram", f"Histogram of {what} in seconds.",
                       histogram.samples(f"vllm:{name}_seconds", label))
        return "\n".join(families) + "\n"
