"""Throughput and latency of `internvl-mpo serve` with 1, 4 and 16 concurrent streaming clients, and the
gain of continuous batching over one-at-a-time decoding (the same load against `--max-batch 1`).

A random checkpoint is written first (the tiny test tokenizer from tests/tokenizer_fixture.py, random
weights; `--preset small` is a 4-layer, 256-wide LLM for a CPU, `--preset 0.5b` has the shape of
Qwen2.5-0.5B, the LLM of InternVL2.5-1B, for a GPU). The server runs as a real subprocess; each client
is a thread that sends streaming requests one after the other over loopback with the standard library's
HTTP client. Every request asks for exactly `--max-tokens` tokens (`ignore_eos`), so the work is the same
whatever the random model says. Reported per level: completion tokens per second over the level's wall
time, latency percentiles of whole requests and of the first token, and the most rows the server had
decoding at once. Each server is warmed up with one request first; with `--compile`, also with an
untimed round at each level's concurrency before that level, so that the compiling for each row count
falls outside the timed levels. A request that fails (an error status, or a stream that ends on an error)
fails the run, with its status and message.

    python benchmarks/serve.py                                 # CPU, small preset
    python benchmarks/serve.py --preset 0.5b --device cuda     # GPU
"""

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2},
}
TOPICS = ["the sea", "a mountain", "the city at night", "an old library", "a long train journey", "the desert"]


def make_checkpoint(folder: Path, preset: str) -> Path:
    """Tokenizer files of the test fixture and a randomly initialised model sized by `preset`."""
    import dataclasses

    sys.path.insert(0, str(REPO / "tests"))
    from tokenizer_fixture import write_qwen2_tokenizer

    from internvl_mpo.chat.tokenizer import load_tokenizer
    from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig
    from internvl_mpo.model import InternVL

    write_qwen2_tokenizer(folder)
    vocab = len(load_tokenizer(folder))
    vision = dataclasses.replace(VisionConfig(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=56)
    llm = dataclasses.replace(LLMConfig(), vocab_size=vocab, **PRESETS[preset])
    torch.manual_seed(0)
    model = InternVL(ModelConfig(vision=vision, llm=llm, force_image_size=56))
    model.init_weights()
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, max_batch: int, args, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "internvl_mpo.cli", "serve", "--model", str(folder), "--served-model-name", "bench",
           "--port", str(port), "--max-batch", str(max_batch), "--max-len", str(args.max_len), "--device", args.device]
    if args.compile:
        cmd.append("--compile")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if get_json(port, "/health")["status"] == "ok":
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class RequestFailed(Exception):
    """A request the server refused or ended with an error, or whose connection broke."""


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return repr(body[:300])


def stream_request(port: int, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, completion tokens) of one streamed completion;
    RequestFailed where the server answers with an error status or ends the stream on an error."""
    body = json.dumps({
        "model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {error_message(response.read())}")
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RequestFailed(f"the stream ended on an error: {error_message(line[6:])}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    finally:
        conn.close()
    end = time.perf_counter() - start
    return (end if first is None else first), end, tokens


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_level(port: int, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []  # a client stops at its first failed request
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests_per_client):
            topic = TOPICS[(c + r) % len(TOPICS)]
            try:
                out = stream_request(port, f"Client {c}, request {r}: write about {topic}.", max_tokens)
            except Exception as e:  # collected: an exception ends only its thread
                with lock:
                    errors.append(str(e) if isinstance(e, RequestFailed) else repr(e))
                return
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:  # a level with failed requests measures less work than it claims
        raise RequestFailed(f"{clients} clients: {len(errors)} request(s) failed, the first: {errors[0]}")
    latencies = [end for _, end, _ in results]
    firsts = [first for first, _, _ in results]
    return {
        "clients": clients, "requests": len(results), "tokens": sum(n for _, _, n in results), "wall_s": wall,
        "tokens_per_s": sum(n for _, _, n in results) / wall,
        "p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
        "ttft_p50": percentile(firsts, 50),
    }


def bench_server(folder: Path, max_batch: int, args, log: Path) -> list[dict]:
    proc, port = start_server(folder, max_batch, args, log)
    try:
        stream_request(port, "warm up", 8)
        rows = []
        for clients in sorted(args.clients):  # ascending, so the peak-rows counter belongs to its level
            if args.compile:  # compile for every row count this level can use, outside its timing
                run_level(port, min(clients, max_batch), 1, args.max_tokens)
            rows.append(run_level(port, clients, max(args.requests_per_client, args.min_requests // clients),
                                  args.max_tokens))
            rows[-1]["max_active"] = get_json(port, "/health")["max_active"]
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch", type=int, default=16, help="rows of the batched server")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least")
    parser.add_argument("--compile", action="store_true", help="serve with --compile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.max_batch < 2:  # the one-at-a-time run (--max-batch 1) is the baseline it is compared with
        parser.error(f"--max-batch {args.max_batch}: the batched server needs at least 2 rows")
    if min(args.clients) < 1 or args.requests_per_client < 1:
        parser.error("--clients and --requests-per-client need at least 1")
    if args.json is not None and not args.json.parent.is_dir():  # before minutes of measuring, not after
        parser.error(f"--json {args.json}: no folder {args.json.parent} to write the results in")

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(Path(tmp) / "model", args.preset)
        results = {}
        for max_batch in (args.max_batch, 1):
            results[max_batch] = bench_server(folder, max_batch, args, Path(tmp) / f"server-{max_batch}.log")

    print(f"preset {args.preset} on {args.device}, {args.max_tokens} tokens per request, "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}")
    print(f"{'max_batch':>9} {'clients':>7} {'requests':>8} {'tok/s':>9} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} "
          f"{'ttft p50':>8} {'peak rows':>9}")
    for max_batch, rows in results.items():
        for r in rows:
            print(f"{max_batch:9d} {r['clients']:7d} {r['requests']:8d} {r['tokens_per_s']:9.1f} {r['p50']:7.2f} "
                  f"{r['p90']:7.2f} {r['p99']:7.2f} {r['ttft_p50']:8.2f} {r['max_active']:9d}")
    for batched, single in zip(results[args.max_batch], results[1]):
        print(f"{batched['clients']:2d} clients: batching gives {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x "
              f"the tokens/s of one-at-a-time, p50 latency {batched['p50']:.2f} s vs {single['p50']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    from internvl_mpo.errors import InternVLError

    try:
        main()
    except (InternVLError, RequestFailed) as e:  # a bad path or setting, a failed request: one line
        raise SystemExit(f"error: {e}") from None
