"""Hardening, round two: each row of the sweep that failed, refused now in one line (CLI: exit 2) or a 4xx JSON
error (server), with no traceback anywhere. Row names are the sweep's (1i, S02, 2j, ...)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys


import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import gistctl
from gistctl.cli.main import app
from gistctl.serve import Limits, create_app
from gistctl.store import BlobStore

from test_serve import ROOT, free_port, start_server, stop

runner = CliRunner()
DOC = "Ada Lindqvist keeps the lighthouse. The call sign of the radio room is MRW-7. " * 4
NO_MODEL = "/nonexistent/model"  # a check that runs after the model load would fail on this instead


def one_line_exit_2(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(pattern, result.output), result.output


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


@pytest.fixture
def tiny_blob(tiny_model_dir, doc):
    result = runner.invoke(app, ["compress", str(doc), "--model", str(tiny_model_dir), "--adapter", "none",
                                 "--num-gist", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return doc.with_suffix(".kv")


def test_1i_compress_into_a_store_that_is_a_file_fails_before_the_model_loads(doc, tmp_path):
    (tmp_path / "notadir").touch()
    for extra in ([], ["--press", "kvzip"]):
        result = runner.invoke(app, ["compress", str(doc), "--store", str(tmp_path / "notadir"), "--model", NO_MODEL,
                                     *extra])
        one_line_exit_2(result, "is a file, not a directory")
    result = runner.invoke(app, ["compress", str(doc), "--store", str(tmp_path / "notadir" / "sub"), "--model", NO_MODEL])
    one_line_exit_2(result, "is a file, not a directory")


def test_s02_serve_on_a_store_that_is_a_file_fails_before_the_model_loads(tmp_path):
    (tmp_path / "storefile").touch()
    one_line_exit_2(runner.invoke(app, ["serve", "--store", str(tmp_path / "storefile"), "--model", NO_MODEL]),
                    "is a file, not a directory")


def test_s03_serve_on_a_port_already_held_fails_before_the_model_loads(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port), "--store", str(tmp_path / "st"), "--model", NO_MODEL])
    one_line_exit_2(result, f"cannot listen on 127.0.0.1:{port}")
    assert "serving on" not in result.output


def test_2j_a_question_with_a_byte_that_is_not_utf8_names_the_byte(tiny_blob):
    question = "Who keeps the lighthouse\udcff?"  # how a latin-1 terminal's 0xff reaches Python's argv
    one_line_exit_2(runner.invoke(app, ["ask", str(tiny_blob), question]), "not valid UTF-8 text: byte 0xff")
    with pytest.raises(gistctl.errors.DataError, match="lone surrogate U\\+D800"):
        gistctl.prompt.check_question("Who\ud800?")


def test_2k_a_questions_file_that_is_not_utf8_is_one_line(tiny_blob, tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_bytes("Qui garde le phare \xe0 Marrow?\n".encode("latin-1"))
    one_line_exit_2(runner.invoke(app, ["ask", str(tiny_blob), "--questions", str(questions)]),
                    "cannot read questions file .* as UTF-8")


@pytest.fixture(scope="module")
def tiny_gc(tiny_model_dir):
    return gistctl.load(model=str(tiny_model_dir), adapter="none", num_gist=2, device="cpu")


def _client(tiny_gc, tmp_path, **kwargs):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "ok.txt").write_text(DOC)
    app_ = create_app(tiny_gc, BlobStore(tmp_path / "store"), documents_dir=docs,
                      limits=Limits(document_bytes=5_000, request_bytes=8_000, question_tokens=64, max_new_tokens=8),
                      **kwargs)
    return TestClient(app_, raise_server_exceptions=False)


def test_s11_lone_surrogates_in_a_question_or_a_document_are_400(tiny_gc, tmp_path):
    client = _client(tiny_gc, tmp_path)
    posted = client.post("/v1/documents", content=b'{"text": "Ada keeps it. \\ud800"}',
                         headers={"content-type": "application/json"})
    assert posted.status_code == 400 and "not valid UTF-8" in posted.json()["error"], posted.text
    doc_id = client.post("/v1/documents", json={"text": DOC}).json()["id"]
    asked = client.post("/v1/ask", content=('{"documents": ["%s"], "question": "Who\\ud800?"}' % doc_id).encode(),
                        headers={"content-type": "application/json"})
    assert asked.status_code == 400 and "lone surrogate" in asked.json()["error"], asked.text


def test_s07_a_posted_path_with_a_nul_byte_is_400(tiny_gc, tmp_path):
    client = _client(tiny_gc, tmp_path)
    response = client.post("/v1/documents", json={"path": "ok.txt\u0000"})
    assert response.status_code == 400 and "NUL" in response.json()["error"], response.text
    assert client.post("/v1/documents", json={"path": "ok.txt"}).status_code == 200


def test_s14_a_chunked_body_is_cut_at_the_limit_while_streaming(tiny_gc, tmp_path):
    """Driven at the ASGI level, as uvicorn hands a chunked body over: one message per chunk, no Content-Length."""
    import asyncio
    import json

    client = _client(tiny_gc, tmp_path)
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        more = len(pulled) < 50
        return {"type": "http.request", "body": b"x" * 65536, "more_body": more}  # 50 x 64 KiB

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/documents", "raw_path": b"/v1/documents", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8321)}
    asyncio.run(client.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and "over 8,000 bytes" in json.loads(body)["error"]
    assert len(pulled) == 1  # the first 64 KiB chunk is already over 8,000 bytes: nothing more was read


def test_health_shows_no_paths_without_the_token_and_ids_end_with_their_digits(tiny_gc, tmp_path):
    client = _client(tiny_gc, tmp_path, token="s3cret")
    assert set(client.get("/healthz").json()) == {"status", "version"}
    full = client.get("/healthz", headers={"authorization": "Bearer s3cret"}).json()
    assert "store" in full and "adapter" in full
    assert client.get("/v1/documents", headers={"authorization": "Bearer s3crex"}).status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    doc_id = client.post("/v1/documents", json={"text": DOC}, headers=auth).json()["id"]
    assert client.get(f"/v1/documents/{doc_id}%0A", headers=auth).status_code == 400  # a trailing newline is no id


def test_s31_the_server_log_holds_no_traceback_after_the_bad_rows(tiny_model_dir, tmp_path):
    port = free_port()
    proc = start_server(tiny_model_dir, tmp_path / "store", port)
    base = f"http://127.0.0.1:{port}"
    try:
        json_header = {"content-type": "application/json"}
        assert httpx.post(f"{base}/v1/documents", content=b'{"text": "\\ud800"}', headers=json_header).status_code == 400
        doc_id = httpx.post(f"{base}/v1/documents", json={"text": DOC}, timeout=60).json()["id"]
        asked = httpx.post(f"{base}/v1/ask", content=('{"documents": ["%s"], "question": "\\ud800"}' % doc_id).encode(),
                           headers=json_header, timeout=60)
        assert asked.status_code == 400
        big = httpx.post(f"{base}/v1/documents", content=(b"x" * 65536 for _ in range(200)), headers=json_header,
                         timeout=60)
        assert big.status_code == 413
        assert httpx.get(f"{base}/healthz").status_code == 200  # still up
    finally:
        stop(proc)
    log = proc.stderr.read()
    assert "Traceback" not in log, log


def test_the_server_check_sees_a_second_server_on_the_same_port(tiny_model_dir, tmp_path):
    port = free_port()
    proc = start_server(tiny_model_dir, tmp_path / "store", port)
    try:
        second = subprocess.run([sys.executable, "-m", "gistctl", "serve", "--port", str(port), "--store",
                                 str(tmp_path / "store2"), "--model", NO_MODEL], capture_output=True, text=True,
                                cwd=ROOT, timeout=120)
    finally:
        stop(proc)
    assert second.returncode == 2 and "cannot listen" in second.stderr and "Traceback" not in second.stderr
    assert "serving on" not in second.stderr + second.stdout

