"""Load on a warm `gistctl serve`, against one cold `gistctl ask` (issue "Warm and shared", item 5).

    python benchmarks/serve.py --out runs/bench-serve

Starts the server on a free loopback port with a fresh blob store, posts 5 pass-key documents (512-2k tokens,
seed 9401: no training recipe uses it) and one of them again, asks every (document, question) pair once alone
for reference, then sends 200 questions from 8 concurrent clients (httpx, loopback only, bounded in count and
time) and checks each answer against the reference. Then, in the same run: the wall time of one cold
`gistctl ask` on the same blob, and a restart on the same store (nothing recompressed, everything answerable).
Writes results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTIONS = ["What is the pass key?", "What is the pass key mentioned in the text?", "Which pass key is given?",
             "Tell me the pass key.", "What pass key should I remember?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(store: Path, port: int, extra: list[str]) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gistctl", "serve", "--store", str(store), "--port", str(port),
                             "--device", "cpu", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while time.perf_counter() - started < 300:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--documents", type=int, default=5)
    parser.add_argument("--seed", type=int, default=9401)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--out", default="runs/bench-serve")
    parser.add_argument("--server-args", default="", help="extra `gistctl serve` arguments (e.g. --model DIR)")
    args = parser.parse_args(argv)

    from gistctl.data.builders import build_passkey
    from gistctl.data.lengths import load_tokenizer, parse_lengths
    from gistctl.scoring import passkey_match

    extra = args.server_args.split()
    model = extra[extra.index("--model") + 1] if "--model" in extra else None
    records = list(build_passkey(load_tokenizer(model), n=args.documents, seed=args.seed,
                                 tokens=parse_lengths("512..2k"), key_format="alnum6"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="store-", dir=out))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, startup_s = start(store, port, extra)
    result: dict = {"args": vars(args), "server_startup_s": startup_s}
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            posted, post_s = [], []
            for r in records:
                t0 = time.perf_counter()
                posted.append(client.post("/v1/documents", json={"text": r["context"], "name": r["id"]}).json())
                post_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = client.post("/v1/documents", json={"text": records[0]["context"]}).json()
            result["repost_ms"] = (time.perf_counter() - t0) * 1000
            result["repost_compressed"] = again["compressed"]
            result["compress_s_mean"] = statistics.mean(post_s)
            ids = [p["id"] for p in posted]
            pairs = [(d, q) for d in range(len(ids)) for q in QUESTIONS]
            reference, warm_wall = {}, []
            for d, q in pairs:
                t0 = time.perf_counter()
                row = client.post("/v1/ask", json={"documents": [ids[d]], "question": q,
                                                   "max_new_tokens": args.max_new_tokens}).json()["answers"][0]
                warm_wall.append(time.perf_counter() - t0)
                reference[(d, q)] = row["answer"]
            result["warm_question_wall_s_median"] = statistics.median(warm_wall)
            result["reference_passkeys_right"] = sum(passkey_match(reference[(d, QUESTIONS[0])], records[d]["answers"][0])
                                                     for d in range(len(ids)))

        def one(i: int) -> dict:
            d, q = pairs[i % len(pairs)]
            t0 = time.perf_counter()
            try:
                with httpx.Client(base_url=url, timeout=300) as c:
                    response = c.post("/v1/ask", json={"documents": [ids[d]], "question": q,
                                                       "max_new_tokens": args.max_new_tokens})
                wall = time.perf_counter() - t0
                if response.status_code != 200:
                    return {"error": f"{response.status_code} {response.text[:200]}", "wall_s": wall}
                row = response.json()["answers"][0]
                return {"same": row["answer"] == reference[(d, q)] and row["question"] == q,
                        "ttft_ms": row["ttft_ms"], "wall_s": wall}
            except httpx.HTTPError as err:
                return {"error": repr(err), "wall_s": time.perf_counter() - t0}

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            rows = list(pool.map(one, range(args.questions)))
        load_s = time.perf_counter() - t0
        ok = [r for r in rows if "error" not in r]
        result["load"] = {"questions": args.questions, "clients": args.clients, "seconds": load_s,
                          "questions_per_s": args.questions / load_s, "errors": len(rows) - len(ok),
                          "mismatched": sum(not r["same"] for r in ok),
                          "ttft_ms_p50": percentile([r["ttft_ms"] for r in ok], 0.5),
                          "ttft_ms_p95": percentile([r["ttft_ms"] for r in ok], 0.95),
                          "wall_s_p50": percentile([r["wall_s"] for r in ok], 0.5),
                          "wall_s_p95": percentile([r["wall_s"] for r in ok], 0.95)}
        result["server_peak_rss_bytes"] = peak_rss_bytes(server.pid)
    finally:
        stop(server)
    # one cold `gistctl ask` on the same blob, the same question
    blob = store / f"{ids[0]}.kv"
    cold = [sys.executable, "-m", "gistctl", "ask", str(blob), QUESTIONS[0], "--device", "cpu",
            "--max-new-tokens", str(args.max_new_tokens)]
    t0 = time.perf_counter()
    done = subprocess.run(cold, capture_output=True, text=True)
    result["cold_ask_wall_s"] = time.perf_counter() - t0
    result["cold_ask_same"] = done.stdout.strip() == reference[(0, QUESTIONS[0])]
    result["warm_vs_cold"] = result["cold_ask_wall_s"] / result["warm_question_wall_s_median"]
    # restart on the same store: nothing recompressed, every document answerable
    mtimes = {p.name: p.stat().st_mtime for p in store.glob("*.kv")}
    server, restart_s = start(store, port, extra)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            listed = {d["id"] for d in client.get("/v1/documents").json()["documents"]}
            answers = [client.post("/v1/ask", json={"documents": [i], "question": QUESTIONS[0],
                                                    "max_new_tokens": args.max_new_tokens}).json()["answers"][0]["answer"]
                       for i in ids]
            reposted = client.post("/v1/documents", json={"text": records[1]["context"]}).json()
    finally:
        stop(server)
    result["restart"] = {"startup_s": restart_s, "listed_all": listed == set(ids),
                         "answers_as_before": answers == [reference[(d, QUESTIONS[0])] for d in range(len(ids))],
                         "recompressed": reposted["compressed"] or mtimes != {p.name: p.stat().st_mtime
                                                                               for p in store.glob("*.kv")}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    load = result["load"]
    print("| what | measured |")
    print("|---|---|")
    print(f"| one question, warm server (median wall, {len(pairs)} asked alone) | {result['warm_question_wall_s_median']:.3f} s |")
    print(f"| one cold `gistctl ask` (wall, same blob and question) | {result['cold_ask_wall_s']:.1f} s |")
    print(f"| warm vs cold | {result['warm_vs_cold']:.0f}x faster |")
    print(f"| {load['questions']} questions, {load['clients']} concurrent clients | {load['errors']} errors, "
          f"{load['mismatched']} answers unlike the same question asked alone |")
    print(f"| TTFT p50 / p95 (server) | {load['ttft_ms_p50']:.0f} / {load['ttft_ms_p95']:.0f} ms |")
    print(f"| wall per question p50 / p95 (client, queued) | {load['wall_s_p50']:.2f} / {load['wall_s_p95']:.2f} s |")
    print(f"| questions/s | {load['questions_per_s']:.1f} |")
    print(f"| server peak RSS | {result['server_peak_rss_bytes'] / 2**20:.0f} MiB |")
    print(f"| same document posted twice | second POST {result['repost_ms']:.0f} ms, compressed again: "
          f"{result['repost_compressed']} (first: {result['compress_s_mean']:.2f} s mean) |")
    r = result["restart"]
    print(f"| restart on the same store | ready in {r['startup_s']:.1f} s, all listed: {r['listed_all']}, answers as "
          f"before: {r['answers_as_before']}, recompressed: {r['recompressed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
