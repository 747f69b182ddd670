"""`gistctl serve`: the model and adapter load once; documents are compressed once into the blob store; questions
are answered from their blobs over HTTP (JSON, or server-sent events with `stream: true`).

    POST   /v1/documents        {text | path, name?}            -> {id, tokens, chunks, blob_bytes, ratio, compressed}
    POST   /v1/ask              {documents: [id, ...], question | questions, max_new_tokens?, stream?}
    GET    /v1/documents        GET /v1/documents/{id}          DELETE /v1/documents/{id}        GET /healthz

One model serves every request: forwards run one at a time under a lock (requests queue, none overlap).
Errors are JSON `{"error": message}` with a 4xx status for what the client can fix; never a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gistctl.errors import ConfigError, DataError, GistctlError
from gistctl.store import BlobStore, UnknownDocument, document_id

from pydantic import BaseModel, Field
from starlette.requests import Request  # at module level: FastAPI resolves endpoint annotations in this module

from gistctl.prompt import MAX_NEW_TOKENS

LOOPBACK_NAMES = ("localhost",)


class TooLarge(DataError):
    """A request over one of the server's `Limits` (HTTP 413)."""


class DocumentIn(BaseModel):
    """POST /v1/documents: the document's text, or a path inside the server's --documents-dir."""

    text: str | None = None
    path: str | None = None
    name: str | None = Field(default=None, max_length=200)


class AskIn(BaseModel):
    """POST /v1/ask: document ids (read side by side when several) and one question or a list."""

    documents: list[str] = Field(min_length=1)
    question: str | None = None
    questions: list[str] | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)  # default: 32, or the server's limit if lower
    stream: bool = False


@dataclass
class Limits:
    """What one request may ask for."""

    document_bytes: int = 2_000_000  # UTF-8 bytes of a posted document
    request_bytes: int = 2_100_000  # the whole request body
    question_tokens: int = 512
    max_new_tokens: int = 128
    documents_per_question: int = 16
    questions_per_request: int = 64


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Listening beyond this machine needs a bearer token."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} listens beyond this machine: give --token SECRET (clients then send "
                          "'Authorization: Bearer SECRET'), or keep the default 127.0.0.1")


def check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, a port another process already listens on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: cannot resolve it ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err} (is another gistctl serve "
                              "running? choose another --port)") from err


class BodyLimit:
    """ASGI middleware: count a request body's bytes as they arrive and stop reading at `limit` (a body sent
    chunked has no Content-Length to check first), answering 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body over {self.limit:,} bytes")
            return message

        return await self.app(scope, limited, send)


def create_app(gc, store: BlobStore, *, token: str | None = None, limits: Limits | None = None,
               documents_dir: str | Path | None = None):
    """The FastAPI app over a loaded `gistctl.engine.Gistctl` and a `BlobStore`. `documents_dir`: the only folder
    whose files `POST /v1/documents {path}` may read (None: posting paths is off)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from gistctl import __version__, prompt
    from gistctl.kv.answer import answer_from_blobs, check_blobs_for_model

    limits = limits or Limits()
    model_lock = threading.Lock()  # one forward at a time: requests queue here
    allowed_dir = Path(documents_dir).resolve() if documents_dir else None
    app = FastAPI(title="gistctl", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limits.request_bytes)
    app.state.compressions = 0

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UnknownDocument)
    async def _unknown(_: Request, err: UnknownDocument):
        return error(404, str(err))

    @app.exception_handler(GistctlError)
    async def _user_error(_: Request, err: GistctlError):
        return error(400, str(err).splitlines()[0])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception):
        return error(500, f"internal error ({type(err).__name__}); see the server log")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if token and request.url.path != "/healthz" and not authorized(request):
            return error(401, "missing or wrong bearer token")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.request_bytes):
            return error(413, f"request body over {limits.request_bytes:,} bytes")
        return await call_next(request)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(given, f"Bearer {token}".encode())

    @app.get("/healthz")
    def healthz(request: Request):
        """Liveness for anyone; which model, adapter and store only for a client with the token (or no token set)."""
        if token and not authorized(request):
            return {"status": "ok", "version": __version__}
        gm = gc.gist_model
        return {"status": "ok", "version": __version__, "model": gm.loaded.name, "adapter": gm.adapter_dir,
                "num_gist": gm.num_gist, "chunk_tokens": gm.chunk_tokens, "store": str(store.root)}

    def read_posted(body: DocumentIn) -> str:
        if (body.text is None) == (body.path is None):
            raise DataError("give exactly one of text or path")
        if body.text is not None:
            text = body.text
        else:
            if allowed_dir is None:
                raise DataError("posting a path is off on this server (start it with --documents-dir DIR); send text")
            if "\x00" in body.path:
                raise DataError("the path holds a NUL byte")
            prompt.check_encodable(body.path, "the path")
            path = (allowed_dir / body.path).resolve()
            if allowed_dir != path and allowed_dir not in path.parents:
                raise DataError(f"path '{body.path}' is outside the documents folder")
            from gistctl.engine import read_document

            text = read_document(path)
        prompt.check_text(text)  # a lone surrogate first: it cannot be encoded to count its bytes
        if len(text.encode("utf-8")) > limits.document_bytes:
            raise TooLarge(f"document over {limits.document_bytes:,} bytes")
        return text

    @app.post("/v1/documents")
    def post_document(body: DocumentIn):
        text = read_posted(body)
        start = time.perf_counter()
        doc_id = document_id(text, gc.gist_model)
        if doc_id in store:  # no wait behind queued questions for a document already compressed
            entry, compressed = store.entry(doc_id), False
        else:
            with model_lock:  # compress checks the store again: another request may have just compressed it
                entry, compressed = store.compress(gc, text, name=body.name or (Path(body.path).name if body.path else None))
        if compressed:
            app.state.compressions += 1
        return {**entry.to_json(), "compressed": compressed, "seconds": round(time.perf_counter() - start, 4)}

    @app.get("/v1/documents")
    def list_documents():
        return {"documents": [e.to_json() for e in store.entries()]}

    @app.get("/v1/documents/{doc_id}")
    def get_document(doc_id: str):
        return store.entry(doc_id).to_json()

    @app.delete("/v1/documents/{doc_id}")
    def delete_document(doc_id: str):
        store.blob_path(doc_id)  # a malformed id is a 400, not a 404
        if not store.delete(doc_id):
            raise UnknownDocument(f"no document '{doc_id}' in the store {store.root}")
        return {"deleted": doc_id}

    def checked_questions(body: AskIn) -> list[str]:
        for doc_id in body.documents:  # malformed ids first: a 400 before anything else
            store.blob_path(doc_id)
        if body.max_new_tokens is None:
            body.max_new_tokens = min(MAX_NEW_TOKENS, limits.max_new_tokens)
        if (body.question is None) == (body.questions is None):
            raise DataError("give exactly one of question or questions")
        questions = [body.question] if body.question is not None else list(body.questions or [])
        if not questions or len(questions) > limits.questions_per_request:
            raise DataError(f"ask 1 to {limits.questions_per_request} questions")
        if len(body.documents) > limits.documents_per_question:
            raise DataError(f"ask at most {limits.documents_per_question} documents at once")
        if body.max_new_tokens > limits.max_new_tokens:
            raise DataError(f"max_new_tokens is at most {limits.max_new_tokens}")
        for q in questions:
            prompt.check_question(q)
            if len(prompt.question_ids(gc.gist_model.tokenizer, q)) > limits.question_tokens:  # after check_question
                raise TooLarge(f"a question is over {limits.question_tokens} tokens")
        return questions

    def blobs_for(ids: list[str]):
        blobs = [store.get(i) for i in dict.fromkeys(ids)]
        check_blobs_for_model(blobs, gc.model_for(blobs))  # press blobs are read by the reader, gist blobs by gists
        return blobs

    @app.post("/v1/ask")
    def ask(body: AskIn):
        questions = checked_questions(body)
        blobs = blobs_for(body.documents)
        ids = list(dict.fromkeys(body.documents))
        if body.stream:
            if len(questions) != 1:
                raise DataError("stream answers one question at a time")
            return StreamingResponse(_sse(blobs, questions[0], body.max_new_tokens, ids), media_type="text/event-stream")
        answers = []
        with model_lock:
            for q in questions:
                a = gc.ask(blobs, q, max_new_tokens=body.max_new_tokens)
                answers.append({"question": q, "answer": a.text, "ttft_ms": round(a.ttft_ms, 3),
                                "decode_tokens_per_s": round(a.decode_tokens_per_s, 2),
                                "prompt_tokens": a.prompt_tokens, "documents": ids})
        return {"answers": answers, "documents": ids}

    def _sse(blobs, question: str, max_new_tokens: int, ids: list[str]):
        """Server-sent events: one `token` event per decoded piece, then `done` with the whole answer."""
        events: queue.Queue = queue.Queue()

        def work():
            try:
                with model_lock:
                    gen = answer_from_blobs(gc.model_for(blobs), blobs, question, max_new_tokens=max_new_tokens,
                                            on_text=lambda piece: events.put(("token", {"text": piece})))
                events.put(("done", {"question": question, "answer": gen.text, "ttft_ms": round(gen.ttft_s * 1000, 3),
                                     "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2),
                                     "prompt_tokens": gen.prompt_tokens, "documents": ids}))
            except GistctlError as err:
                events.put(("error", {"error": str(err).splitlines()[0]}))
            except Exception as err:  # noqa: BLE001 - reported to the client as an event, never a traceback
                events.put(("error", {"error": f"internal error ({type(err).__name__})"}))

        threading.Thread(target=work, daemon=True).start()
        while True:
            kind, data = events.get()
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            if kind in ("done", "error"):
                return

    @app.exception_handler(TooLarge)
    async def _too_large(_: Request, err: TooLarge):
        return error(413, str(err))

    return app


def run_server(gc, store: BlobStore, *, host: str = "127.0.0.1", port: int = 8321, token: str | None = None,
               limits: Limits | None = None, documents_dir: str | None = None, log_level: str = "warning") -> None:
    """Serve until interrupted (uvicorn, one process: the model is loaded once)."""
    import uvicorn

    check_bind(host, token)
    app = create_app(gc, store, token=token, limits=limits, documents_dir=documents_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)
