"""The server's Prometheus metrics (`GET /metrics`, vLLM's names) and its second Ctrl-C, over real HTTP: the real
`internvl-mpo serve` process on the shipped demo model."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from internvl_mpo.server.metrics import Metrics

from conftest import stop

KEY = "test-key"
FORCED = 300  # a token of the demo model's vocabulary, forced by a logit bias and then a stop token
# vLLM's buckets (vllm/v1/metrics/loggers.py)
VLLM_BUCKETS = {
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "vllm:time_per_output_token_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                                           5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:e2e_request_latency_seconds": [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                                         60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0],
}


def launch(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """The `internvl-mpo serve` process of `cmd` (`--port 0`; its output in `log`) and its base url, once it answers
    /health. SIGINT as a terminal's foreground command gets it (a suite run in the background ignores it)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        running = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        try:
            if running and httpx.get(running[1] + "/health", timeout=1).status_code == 200:
                return proc, running[1]
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base url of a running `internvl-mpo serve` of the demo model with an API key, stopped after the module."""
    root = tmp_path_factory.mktemp("serve")
    proc, url = launch([sys.executable, "-m", "internvl_mpo.cli", "serve", "--port", "0", "--api-key", KEY,
                        "--max-tokens", "1800", "--max-len", "2048"], root / "server.log")
    try:
        yield url
    finally:
        stop(proc)


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, tuple], float]]:
    """(type per family, value per (sample name, sorted labels)) of Prometheus text exposition 0.0.4, checking its
    form: each line a HELP, a TYPE or a sample `name{label="value",...} value` of a family whose TYPE came before."""
    types, samples = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name, rest = re.fullmatch(r"# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)", line).groups()
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram") and name not in types
                types[name] = rest
            continue
        name, labels, value = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)", line).groups()
        pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels)
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        assert types.get(name) in ("counter", "gauge") or types.get(family) == "histogram", line
        samples[name, tuple(sorted(pairs))] = math.inf if value == "+Inf" else float(value)
    return types, samples


def scrape(url: str) -> dict[str, float]:
    """The demo model's samples by name, `name{label}` for the finish reasons and buckets; the histograms checked."""
    response = httpx.get(url + "/metrics")  # no API key: as vLLM, the key guards the /v1 routes
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = parse(response.text)
    out = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        assert labels.pop("model_name") == "internvl-mpo-demo"
        out[name + "".join(f"{{{v}}}" for v in labels.values())] = value
    for family, bounds in VLLM_BUCKETS.items():
        assert types[family] == "histogram"
        buckets = [(float(dict(labels)["le"]), value) for (name, labels), value in samples.items()
                   if name == family + "_bucket"]
        assert [le for le, _ in buckets] == bounds + [math.inf]
        counts = [count for _, count in buckets]
        assert counts == sorted(counts) and counts[-1] == out[family + "_count"]  # cumulative, +Inf is the count
        assert out[family + "_sum"] >= 0
    return out


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}], **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def stream_usage(url: str, body: dict) -> tuple[dict, list[str]]:
    """The usage and the finish reasons of a streamed chat answer."""
    usage, finishes = None, []
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                      json={"messages": [{"role": "user", "content": "Hello"}], "stream": True,
                            "stream_options": {"include_usage": True}, **body}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                finishes += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
    return usage, finishes


def settled(url: str, **expected: float) -> dict[str, float]:
    """The samples once those named in `expected` have those values (the worker sets its gauges after each step)."""
    deadline = time.monotonic() + 60
    while any((now := scrape(url))[name] != value for name, value in expected.items()):
        assert time.monotonic() < deadline, (expected, now)
        time.sleep(0.05)
    return now


def test_metrics_count_tokens_requests_by_finish_reason_and_latencies(server):
    """Plain and streamed answers, `n` 2, cut by max_tokens or stopped by a stop token: vLLM's counters hold what their
    `usage` says (each choice a request that prefills its prompt, as vLLM's engine counts them), the latency
    histograms count each choice once (time per output token: each token after a choice's first)."""
    before = settled(server, **{"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0})
    stop = {"max_tokens": 8, "logit_bias": {str(FORCED): 100}, "stop_token_ids": [FORCED]}
    plain = [post(server, {"max_tokens": 4, "n": 2, "ignore_eos": True}), post(server, stop)]
    assert [[c["finish_reason"] for c in r.json()["choices"]] for r in plain] == [["length", "length"], ["stop"]]
    usages = [(r.json()["usage"], len(r.json()["choices"])) for r in plain]
    for body, finish in (({"max_tokens": 3, "ignore_eos": True}, "length"), (stop, "stop")):
        usage, finishes = stream_usage(server, body)
        assert finishes == [finish]
        usages.append((usage, 1))
    after = settled(server, **{"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0})

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("vllm:request_success_total{length}") == 3 and grew("vllm:request_success_total{stop}") == 2
    assert grew("vllm:request_success_total{abort}") == grew("vllm:request_success_total{error}") == 0
    assert grew("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] * n for u, n in usages)
    generated = sum(u["completion_tokens"] for u, _ in usages)
    assert generated == 4 * 2 + 1 + 3 + 1 and grew("vllm:generation_tokens_total") == generated
    assert grew("vllm:time_to_first_token_seconds_count") == grew("vllm:e2e_request_latency_seconds_count") == 5
    assert grew("vllm:time_per_output_token_seconds_count") == generated - 5
    assert grew("vllm:e2e_request_latency_seconds_sum") >= grew("vllm:time_to_first_token_seconds_sum") > 0


def test_running_requests_and_a_client_that_goes_away_as_an_abort(server):
    """While a streamed answer of `n` 2 is decoded its two choices run; a client that goes away ends them as aborted."""
    before = settled(server, **{"vllm:num_requests_running": 0})
    body = {"messages": [{"role": "user", "content": "Go on."}], "stream": True, "max_tokens": 1800, "n": 2,
            "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        # chunks with text per choice: the worker counts the running choices after each step, so a choice's second
        # chunk comes from a step after the one of its first, and once both have two, after a step ran both
        seen = [0, 0]
        lines = response.iter_lines()  # held: a generator let go of closes the response
        for line in lines:
            for choice in json.loads(line[6:])["choices"] if line.startswith("data: {") else []:
                seen[choice["index"]] += bool(choice["delta"].get("content"))
            if min(seen) == 2:
                break
        assert min(seen) == 2, response.status_code
        assert scrape(server)["vllm:num_requests_running"] == 2
    aborted = before["vllm:request_success_total{abort}"] + 2
    after = settled(server, **{"vllm:num_requests_running": 0, "vllm:request_success_total{abort}": aborted})
    assert after["vllm:e2e_request_latency_seconds_count"] == before["vllm:e2e_request_latency_seconds_count"] + 2


def test_metrics_need_no_api_key_as_in_vllm_while_the_v1_routes_do(server):
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/metrics").status_code == 200


def test_a_request_that_fails_in_the_engine_is_counted_as_an_error(monkeypatch):
    """A prefill that raises fails its request alone (a 500): counted finished with vLLM's reason `error`, with no
    first token; the one beside it is served and counted as usual."""
    import queue

    import torch

    from internvl_mpo.cli import default_model
    from internvl_mpo.generate.engine import Request
    from internvl_mpo.generate.params import SamplingParams
    from internvl_mpo.pipeline import InternVLChat
    from internvl_mpo.server.worker import BatchWorker, Job

    chat = InternVLChat.from_pretrained(default_model(), dtype=torch.float32)
    prefill = chat.engine.prefill

    def failing(request, caches, row):
        if request.prompt_ids[0] == 1:
            raise RuntimeError("out of memory")
        return prefill(request, caches, row)

    monkeypatch.setattr(chat.engine, "prefill", failing)
    worker = BatchWorker(chat, max_batch=2, max_len=64)
    finals: queue.SimpleQueue = queue.SimpleQueue()
    for first in (1, 2):
        request = Request([first, 5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))
        worker.submit(Job(request, 0, lambda item: finals.put(item) if isinstance(item, Exception) or
                          item.finish_reason else None))
    worker.start()
    try:
        ends = [finals.get(timeout=60), finals.get(timeout=60)]
    finally:
        worker.stop()
    assert sorted(type(end).__name__ for end in ends) == ["ApiError", "Chunk"]
    _, samples = parse(worker.metrics.text("m"))
    values = {name + "".join(f"{{{v}}}" for k, v in labels if k in ("finished_reason", "le")): value
              for (name, labels), value in samples.items()}
    assert values["vllm:request_success_total{error}"] == values["vllm:request_success_total{length}"] == 1
    assert values["vllm:e2e_request_latency_seconds_count"] == 2
    assert values["vllm:time_to_first_token_seconds_count"] == 1  # the failed one made none
    assert values["vllm:prompt_tokens_total"] == 4 and values["vllm:generation_tokens_total"] == 3



def test_an_observation_on_a_bucket_bound_counts_in_that_bucket():
    """Prometheus' buckets count the values at most their bound (le): a value equal to a bound is in its bucket."""
    from internvl_mpo.server.metrics import Histogram

    histogram = Histogram((0.1, 0.5, 1.0))
    for value in (0.1, 0.5, 0.7, 3.0):
        histogram.observe(value)
    assert histogram.samples("t", 'm="x"')[:4] == ['t_bucket{m="x",le="0.1"} 1', 't_bucket{m="x",le="0.5"} 2',
                                                    't_bucket{m="x",le="1.0"} 3', 't_bucket{m="x",le="+Inf"} 4']

def test_a_model_name_is_escaped_in_its_label():
    _, samples = parse(Metrics().text('a"b\\c\nd'))
    assert {dict(labels)["model_name"] for _, labels in samples} == {r'a\"b\\c\nd'}


def stopped_while_a_body_comes(tmp_path: Path, second_ctrl_c: bool) -> str:
    """The output of a server sent Ctrl-C (and a second one while it waits for its open connections, if asked) as
    a request's body is still coming, once it has exited as a Ctrl-C'd command does (130)."""
    log = tmp_path / "server.log"
    proc, url = launch([sys.executable, "-m", "internvl_mpo.cli", "serve", "--port", "0"], log)
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            time.sleep(0.5)  # the request is being read
            proc.send_signal(signal.SIGINT)
            if second_ctrl_c:
                deadline = time.monotonic() + 60
                while "Waiting for connections to close" not in log.read_text():
                    assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                    time.sleep(0.02)
                proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text
    return text


def test_a_connection_still_open_after_the_grace_period_is_cut_off_with_one_line(tmp_path):
    """Ctrl-C leaves a connection open for 5 s (here a request whose body is still coming), then drops it: its request
    ends as one whose client went away, with one line saying so (uvicorn cancelled its task, logging a traceback)."""
    lines = stopped_while_a_body_comes(tmp_path, second_ctrl_c=False).splitlines()
    assert "INFO:     1 connection still open 5 s after the stop signal: cut off" in lines
    assert lines[-1].startswith("INFO:     Finished server process")


def test_a_second_ctrl_c_while_the_server_drains_ends_it_at_once_with_one_line(tmp_path):
    """A second Ctrl-C while the server waits for its open connections ends it then and there, with one line saying
    so and no traceback (uvicorn's forced exit cancelled the open requests with the event loop, each logged with a
    traceback)."""
    text = stopped_while_a_body_comes(tmp_path, second_ctrl_c=True)
    assert text.splitlines()[-1] == "INFO:     a second Ctrl-C: the server stops now, its 1 open connection cut off"
