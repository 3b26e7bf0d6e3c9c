"""One refusal path (daemon/httpapp.py, ntm/errors.py): every coded error class of the servers
carries its HTTP status, and the one middleware answers refusals, oversize bodies and bugs alike
for the DC, the CS and the RS."""

from __future__ import annotations

import ast
import importlib
import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cs.errors import CsError
from daemon import httpapp, service
from ntm.errors import CodedError, NtmError, ParseError, SignatureError

ROOT = Path(__file__).resolve().parent.parent
SERVED = ("ntm", "daemon", "dc", "cs", "rs")  # packages whose errors can reach a server's edge
# Coded errors never answered by a server: raised and caught on the client side of a link.
NOT_SERVED = {"GroupError", "ChannelError"}


def coded_classes() -> dict[str, type[CodedError]]:
    """Every CodedError subclass the served packages define, by name."""
    for pkg in SERVED:
        for path in (ROOT / pkg).glob("*.py"):
            if path.stem != "__main__":
                importlib.import_module(f"{pkg}.{path.stem}")
    found, todo = {}, [CodedError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in SERVED:
                found[sub.__name__] = sub
    return found


def raised_codes(classes: dict[str, type]) -> set[tuple[str, str]]:
    """(class, code) of every `SomeCodedError("code", ...)` in the served packages' source."""
    out = set()
    for pkg in SERVED:
        for path in (ROOT / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in classes
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    out.add((node.func.id, node.args[0].value))
    return out


def test_every_coded_error_of_the_servers_has_a_status():
    """A new refusal class or code must not reach a client with a status nobody chose: each class
    states its own table or default, and every code raised maps to a 4xx/5xx that it carries."""
    classes = coded_classes()
    assert {
        "CsError",
        "DirectionError",
        "NodeLookupError",
        "RegistrationError",
        "PathError",
        "GmsRefused",
        "SourceLimited",
    } <= set(classes)
    unstated = [
        n for n, c in classes.items() if n not in NOT_SERVED and not ({"STATUS", "DEFAULT_STATUS"} & set(vars(c)))
    ]
    assert not unstated, f"coded errors without a status of their own: {unstated}"
    codes = raised_codes(classes)
    assert len(codes) > 40
    for name, code in codes:
        status, wire = classes[name](code, "m").refusal()
        assert 400 <= status < 600 and wire == code, (name, code, status)
    for cls in classes.values():
        assert all(400 <= s < 600 for s in cls.STATUS.values())


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (CsError("over_quota", "m"), 429, "over_quota"),
        (CsError("cs_full", "m"), 507, "cs_full"),
        (ParseError("m"), 400, "malformed"),
        (SignatureError("m"), 403, "forbidden"),
        (NtmError("m"), 503, "unavailable"),
    ],
)
def test_the_status_belongs_to_the_error(exc, status, code):
    assert exc.refusal() == (status, code)
    assert httpapp.refusal(exc, 1) == (status, {"error": code, "message": "m"})


async def test_refusals_oversize_bodies_and_bugs_through_the_one_middleware(caplog):
    """Hostile client: an oversize body gets a JSON 413 and a refusal its class's status; a bug
    its exception provokes (a handler raising a foreign exception) answers 500 with nothing of the
    bug in the body, and costs one log line without a traceback."""
    refused = []
    app = httpapp.make_app(128, lambda req, exc, code: refused.append(code))

    async def refuse(request: web.Request) -> web.Response:
        raise CsError("busy", "two at once")

    async def bug(request: web.Request) -> web.Response:
        {}["secret-detail"]

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await service.read_json(request))

    app.router.add_get("/refuse", refuse)
    app.router.add_get("/bug", bug)
    app.router.add_post("/echo", echo)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/refuse")
        assert (r.status, await r.json()) == (409, {"error": "busy", "message": "two at once"})
        r = await client.post("/echo", data=b"[" * 40 + b"]" * 40)
        assert r.status == 400 and (await r.json())["error"] == "malformed"  # nests too deep
        r = await client.post("/echo", data=b"[%d]" % 2**64)
        assert r.status == 400 and (await r.json())["error"] == "malformed"  # beyond 64 bits
        r = await client.post("/echo", data=b"1" * 129)
        assert (r.status, await r.json()) == (413, {"error": "too_large", "message": "request body exceeds 128 bytes"})
        assert (await client.get("/nowhere")).status == 404  # aiohttp's own answers pass through
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            r = await client.get("/bug")
            body = await r.text()
        assert r.status == 500 and r.content_type == "application/json"
        assert "secret" not in body and "Traceback" not in body and "KeyError" not in body
        errors = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(errors) == 1 and errors[0].exc_info is None, [rec.getMessage() for rec in errors]
        line = errors[0].getMessage()
        assert "\n" not in line and "KeyError" in line and "test_refusal_path.py:" in line
    assert refused == ["busy", "malformed", "malformed", "too_large"]
