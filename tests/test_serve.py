"""`gistctl serve` and the blob store: endpoints and their errors (TestClient), a real server process over
loopback (httpx), restarts, two servers on one store, and questions over several documents."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import gistctl
from gistctl.serve import Limits, check_bind, create_app
from gistctl.store import BlobStore, document_id

ROOT = Path(__file__).resolve().parents[1]
DOC_A = "Ada Lindqvist keeps the lighthouse. The call sign of the radio room is MRW-7. " * 4
DOC_B = "The grass is green. The pass key is 7K2P9A. Remember it. The sky is blue. " * 4


@pytest.fixture(scope="module")
def tiny_gc(tiny_model_dir):
    return gistctl.load(model=str(tiny_model_dir), adapter="none", num_gist=2, device="cpu")


@pytest.fixture
def client(tiny_gc, tmp_path):
    app = create_app(tiny_gc, BlobStore(tmp_path / "store"), limits=Limits(document_bytes=5_000, request_bytes=8_000,
                                                                            question_tokens=64, max_new_tokens=8))
    return TestClient(app)


def test_documents_are_compressed_once_and_listed(client, tiny_gc, tmp_path):
    first = client.post("/v1/documents", json={"text": DOC_A, "name": "a.txt"})
    assert first.status_code == 200, first.text
    doc = first.json()
    assert doc["compressed"] is True and doc["name"] == "a.txt" and doc["chunks"] >= 1
    assert doc["id"] == document_id(DOC_A, tiny_gc.gist_model)
    assert doc["ratio"] == pytest.approx(doc["full_kv_bytes"] / doc["blob_bytes"], rel=1e-3)
    again = client.post("/v1/documents", json={"text": DOC_A})
    assert again.json()["compressed"] is False and again.json()["id"] == doc["id"]
    assert client.app.state.compressions == 1
    assert [d["id"] for d in client.get("/v1/documents").json()["documents"]] == [doc["id"]]
    assert client.get(f"/v1/documents/{doc['id']}").json()["tokens"] == doc["tokens"]
    assert client.delete(f"/v1/documents/{doc['id']}").status_code == 200
    assert client.get(f"/v1/documents/{doc['id']}").status_code == 404
    assert client.get("/healthz").json()["status"] == "ok"


def test_ask_one_and_several_documents(client, tiny_gc):
    a = client.post("/v1/documents", json={"text": DOC_A}).json()["id"]
    b = client.post("/v1/documents", json={"text": DOC_B}).json()["id"]
    answer = client.post("/v1/ask", json={"documents": [a], "question": "Who keeps it?", "max_new_tokens": 4})
    assert answer.status_code == 200, answer.text
    row = answer.json()["answers"][0]
    assert isinstance(row["answer"], str) and row["ttft_ms"] > 0 and row["documents"] == [a]
    both = client.post("/v1/ask", json={"documents": [a, b], "questions": ["Who keeps it?", "What is the pass key?"],
                                        "max_new_tokens": 4})
    assert both.status_code == 200, both.text
    assert [r["question"] for r in both.json()["answers"]] == ["Who keeps it?", "What is the pass key?"]
    assert both.json()["documents"] == [a, b]


def test_answers_equal_the_python_api(client, tiny_gc, tmp_path):
    """What the server answers is what `Gistctl.ask` answers on the same blobs (one document and two)."""
    store = BlobStore(tmp_path / "store")
    a = client.post("/v1/documents", json={"text": DOC_A}).json()["id"]
    b = client.post("/v1/documents", json={"text": DOC_B}).json()["id"]
    for ids in ([a], [a, b]):
        served = client.post("/v1/ask", json={"documents": ids, "question": "What is the call sign?",
                                              "max_new_tokens": 6}).json()["answers"][0]["answer"]
        direct = tiny_gc.ask([store.get(i) for i in ids], "What is the call sign?", max_new_tokens=6).text
        assert served == direct


def test_press_blobs_in_the_store_are_asked_as_the_python_api_asks_them(client, tiny_gc, tmp_path):
    store = BlobStore(tmp_path / "store")
    entry, compressed = store.compress(tiny_gc, DOC_A, press="kvzip", ratio=0.5)
    assert compressed and store.compress(tiny_gc, DOC_A, press="kvzip", ratio=0.5)[1] is False
    assert entry.id != store.compress(tiny_gc, DOC_A, press="kvzip", ratio=0.75)[0].id  # the ratio is in the id
    assert store.get(entry.id).meta.press == "kvzip"
    served = client.post("/v1/ask", json={"documents": [entry.id], "question": "What is the call sign?",
                                          "max_new_tokens": 6})
    assert served.status_code == 200, served.text
    direct = tiny_gc.ask(store.get(entry.id), "What is the call sign?", max_new_tokens=6).text
    assert served.json()["answers"][0]["answer"] == direct


def test_stream_sends_tokens_then_the_answer(client, tiny_gc):
    a = client.post("/v1/documents", json={"text": DOC_A}).json()["id"]
    with client.stream("POST", "/v1/ask", json={"documents": [a], "question": "Who keeps it?", "stream": True,
                                                 "max_new_tokens": 6}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    done = events[-1]
    assert "answer" in done and all("text" in e for e in events[:-1])
    assert "".join(e["text"] for e in events[:-1]).strip() == done["answer"]


@pytest.mark.parametrize("method, path, body, status, message", [
    ("post", "/v1/ask", {"documents": ["../../etc/passwd"], "question": "Q?"}, 400, "not a document id"),
    ("post", "/v1/ask", {"documents": ["0" * 32], "question": "Q?"}, 404, "no document"),
    ("post", "/v1/ask", {"documents": [], "question": "Q?"}, 422, "documents"),
    ("get", "/v1/documents/..secret", None, 400, "not a document id"),
    ("get", "/v1/documents/..%2F..%2Fsecret", None, 404, "Not Found"),  # no route: never a path in the store
    ("delete", "/v1/documents/" + "f" * 32, None, 404, "no document"),
    ("post", "/v1/documents", {"text": "x" * 6_000}, 413, "over 5,000 bytes"),
    ("post", "/v1/documents", {"text": "y" * 9_000}, 413, "request body over"),
    ("post", "/v1/documents", {"text": "   \x00 "}, 400, "no text"),
    ("post", "/v1/documents", {"path": "/etc/passwd"}, 400, "posting a path is off"),
    ("post", "/v1/documents", {"text": "a", "path": "b"}, 400, "exactly one of text or path"),
    ("post", "/v1/documents", "not json", 422, ""),
])
def test_errors_are_json_with_a_message(client, method, path, body, status, message):
    kwargs = {} if body is None else ({"content": body, "headers": {"content-type": "application/json"}}
                                      if isinstance(body, str) else {"json": body})
    response = getattr(client, method)(path, **kwargs) if body is not None else getattr(client, method)(path)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and "Traceback" not in response.text


def test_question_errors(client):
    a = client.post("/v1/documents", json={"text": DOC_A}).json()["id"]
    for body, status, message in [
        ({"question": "   "}, 400, "question is blank"),
        ({"question": "why " * 200}, 413, "over 64 tokens"),
        ({"question": "Q?", "max_new_tokens": 99}, 400, "at most 8"),
        ({"question": "Q?", "questions": ["R?"]}, 400, "exactly one of question or questions"),
    ]:
        response = client.post("/v1/ask", json={"documents": [a], **body})
        assert response.status_code == status and message in response.json()["error"], response.text


def test_token_is_required_when_set(tiny_gc, tmp_path):
    client = TestClient(create_app(tiny_gc, BlobStore(tmp_path / "s"), token="sesame"))
    assert client.get("/v1/documents").status_code == 401
    assert client.get("/v1/documents", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/documents", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_listening_beyond_loopback_needs_a_token():
    from gistctl.errors import ConfigError

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(ConfigError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "secret")


def test_posted_paths_stay_inside_the_documents_folder(tiny_gc, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(DOC_A)
    (tmp_path / "outside.txt").write_text(DOC_B)
    client = TestClient(create_app(tiny_gc, BlobStore(tmp_path / "s"), documents_dir=folder))
    assert client.post("/v1/documents", json={"path": "a.txt"}).json()["name"] == "a.txt"
    response = client.post("/v1/documents", json={"path": "../outside.txt"})
    assert response.status_code == 400 and "outside the documents folder" in response.json()["error"]


def test_several_documents_read_as_each_alone_when_one_is_given(tiny_gc):
    """One blob through the side-by-side path answers exactly as asked alone; two change the cache, not the
    first blob's place: its keys are moved only by the difference of the question positions."""
    import torch

    from gistctl.kv.answer import answer_from_blob, blobs_cache

    a, b = tiny_gc.compress(DOC_A), tiny_gc.compress(DOC_B)
    assert a.meta.next_position != b.meta.next_position  # one of them is moved
    alone = answer_from_blob(tiny_gc.gist_model, a, "Who keeps it?", max_new_tokens=5)
    assert tiny_gc.ask([a], "Who keeps it?", max_new_tokens=5).text == alone.text
    cache, entries, first, _ = blobs_cache([a, b], tiny_gc.gist_model.model)
    assert entries == a.meta.total_gists + b.meta.total_gists
    assert first == max(a.meta.next_position, b.meta.next_position)
    layer0 = cache.layers[0].keys[0]  # (kv_heads, entries, head_dim)
    later = b if b.meta.next_position == first else a
    offset = 0 if later is a else a.meta.total_gists
    assert torch.allclose(layer0[:, offset:offset + later.meta.total_gists].float(), later.keys[0].float())


# a real server process ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, store: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gistctl", "serve", "--model", str(model_dir), "--adapter", "none",
                             "--num-gist", "2", "--device", "cpu", "--store", str(store), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start in time")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), SIGKILL after 20 s."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    if proc.poll() is None:
        proc.kill()


def test_real_server_restart_and_two_servers_on_one_store(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    one, two = free_port(), free_port()
    first = start_server(tiny_model_dir, store, one)
    try:
        posted = httpx.post(f"http://127.0.0.1:{one}/v1/documents", json={"text": DOC_A}, timeout=60).json()
        assert posted["compressed"] is True
        asked = httpx.post(f"http://127.0.0.1:{one}/v1/ask", json={"documents": [posted["id"]], "question": "Who?",
                                                                    "max_new_tokens": 4}, timeout=60).json()
        # a second server on the same store answers without compressing again
        second = start_server(tiny_model_dir, store, two)
        try:
            again = httpx.post(f"http://127.0.0.1:{two}/v1/documents", json={"text": DOC_A}, timeout=60).json()
            assert again["compressed"] is False and again["id"] == posted["id"]
            started = time.perf_counter()
            other = httpx.post(f"http://127.0.0.1:{two}/v1/ask", json={"documents": [posted["id"]], "question": "Who?",
                                                                        "max_new_tokens": 4}, timeout=60).json()
            assert other["answers"][0]["answer"] == asked["answers"][0]["answer"]
            assert time.perf_counter() - started < 30
        finally:
            stop(second)
    finally:
        stop(first)
    blob_mtime = (store / f"{posted['id']}.kv").stat().st_mtime
    # restarted: every stored document still answerable, nothing recompressed
    third = start_server(tiny_model_dir, store, one)
    try:
        listed = httpx.get(f"http://127.0.0.1:{one}/v1/documents", timeout=30).json()["documents"]
        assert [d["id"] for d in listed] == [posted["id"]]
        after = httpx.post(f"http://127.0.0.1:{one}/v1/ask", json={"documents": [posted["id"]], "question": "Who?",
                                                                    "max_new_tokens": 4}, timeout=60).json()
        assert after["answers"][0]["answer"] == asked["answers"][0]["answer"]
    finally:
        stop(third)
    assert (store / f"{posted['id']}.kv").stat().st_mtime == blob_mtime


def test_cli_store_and_several_blobs(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from gistctl.cli.main import app

    runner = CliRunner()
    (tmp_path / "a.txt").write_text(DOC_A)
    (tmp_path / "b.txt").write_text(DOC_B)
    model = ["--model", str(tiny_model_dir), "--adapter", "none", "--num-gist", "2"]
    stored = runner.invoke(app, ["compress", str(tmp_path / "a.txt"), "--store", str(tmp_path / "store"), *model])
    assert stored.exit_code == 0 and "stored" in stored.output, stored.output
    doc_id = stored.output.split()[1]
    again = runner.invoke(app, ["compress", str(tmp_path / "a.txt"), "--store", str(tmp_path / "store"), *model])
    assert "already stored" in again.output
    assert runner.invoke(app, ["compress", str(tmp_path / "b.txt"), "-o", str(tmp_path / "b.kv"), *model]).exit_code == 0
    both = runner.invoke(app, ["ask", doc_id, str(tmp_path / "b.kv"), "Who keeps it?", "What is the pass key?",
                               "--store", str(tmp_path / "store"), "--max-new-tokens", "3", "--json"])
    assert both.exit_code == 0, both.output
    rows = [json.loads(line) for line in both.stdout.splitlines()]
    assert [r["question"] for r in rows] == ["Who keeps it?", "What is the pass key?"]
    size = (tmp_path / "store" / f"{doc_id}.kv").stat().st_size + (tmp_path / "b.kv").stat().st_size
    assert rows[0]["state_bytes"] == size
    missing = runner.invoke(app, ["ask", str(tmp_path / "nope.kv"), str(tmp_path / "b.kv"), "Who?"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
