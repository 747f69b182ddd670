"""Where KVzip's compress time goes on one document: the prefill, the repeat forwards alone (a no-op observer) and
with the observer that scores every entry, and the repeat at another chunk size. Run it alone on the machine.

    python benchmarks/kvzip_cost.py --data data/dev/squad_dev30.jsonl        # the longest document of the file
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import gistctl.kv.presses.kvzip as kvzip
from gistctl.engine import DEFAULT_READER, open_reader_model
from gistctl.kv.press import prefill_document


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="JSONL with a `context` field; the longest one is timed")
    parser.add_argument("--chunks", default="512,1024", help="repeat chunk sizes to time with the observer")
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as f:
        text = max((json.loads(line)["context"] for line in f if line.strip()), key=len)
    gm = open_reader_model(None, DEFAULT_READER)
    prefill_document(gm, text)  # warm-up
    prefill = min(seconds(lambda: prefill_document(gm, text)) for _ in range(2))
    doc = prefill_document(gm, text)
    print(f"threads {torch.get_num_threads()}, {doc.length} tokens, prefill {prefill:.2f} s (best of 2)")
    real = kvzip.observe_attention
    kvzip.observe_attention = lambda model, fn: real(model, lambda *a: None)
    try:
        bare = seconds(lambda: kvzip.KVzipPress().score(doc))
    finally:
        kvzip.observe_attention = real
    print(f"repeat forwards, no-op observer: {bare:.2f} s = {bare / prefill:.2f}x the prefill")
    for chunk in (int(c) for c in args.chunks.split(",")):
        took = seconds(lambda: kvzip.KVzipPress(chunk=chunk).score(doc))
        print(f"kvzip score, chunk {chunk}: {took:.2f} s = {took / prefill:.2f}x; prefill + score = "
              f"{1 + took / prefill:.2f}x the prefill")


if __name__ == "__main__":
    main()
