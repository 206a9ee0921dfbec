"""A stub of ZorgTTP's TRES web service, from the public client ZorgTTP/rtres (``R/request.R``, tests and
vignettes): form-encoded ``POST /Service/encryptpost`` and ``/Service/decryptpost`` with ``text`` (values
joined by ``separator``, default ``#``), ``dn``, ``pn``, ``un``, ``pw``, ``si``, ``se``; JSON answer with
``ResponseCode`` and ``ResponseMessage``, ``#``-joined, one entry per value.

Ciphertexts follow the shape rtres' tests show (``3::<key id>::1:<iv>::<search image or empty>::<ct>``) and
are deterministic when unsalted, as there. Which abort code TRES uses for which failure is not public; the
stub's choice (100 wrong credentials, 200 unknown domain/project, 999 more than ``max_values`` values) is an
assumption of this stub, not TRES documentation. Whitespace-only → 310, undecryptable → 316 (both public).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.stubs.common import Script

KEY_ID = "f752737e-57f2-4ed0-93e9-600982607393"  # the key id shape from rtres' tests
_KEY = hashlib.sha512(b"tres-stub test key (public, never real)").digest()


@dataclass
class TresState:
    username: str = "gateway"
    password: str = "test-password"  # test constant
    domain: str = "zorgttp.nl"
    project: str = "registry-mrn"
    max_values: int = 1000
    requests: list[dict[str, Any]] = field(default_factory=list)  # endpoint, values, form fields
    script: Script = field(default_factory=Script)

    def received(self, endpoint: str) -> list[list[str]]:
        return [r["values"] for r in self.requests if r["endpoint"] == endpoint]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encrypt(value: str, search_image: bool) -> str:
    iv = hmac.new(_KEY[:32], value.encode(), hashlib.sha256).digest()[:16]
    image = "1:" + _b64(hmac.new(_KEY[32:], value.encode(), hashlib.sha384).digest()) if search_image else ""
    ct = AESSIV(_KEY).encrypt(value.encode(), [iv])
    return f"3::{KEY_ID}::1:{_b64(iv)}::{image}::{_b64(ct)}"


def decrypt(value: str) -> str | None:
    parts = value.split("::")
    if len(parts) != 5 or parts[0] != "3" or parts[1] != KEY_ID or not parts[2].startswith("1:"):
        return None
    try:
        iv = base64.b64decode(parts[2][2:], validate=True)
        return AESSIV(_KEY).decrypt(base64.b64decode(parts[4], validate=True), [iv]).decode()
    except Exception:  # noqa: BLE001 - any failure is "not a valid encrypted value"
        return None


def _reply(codes: list[int], messages: list[str]) -> Response:
    return JSONResponse({"ResponseCode": "#".join(map(str, codes)), "ResponseMessage": "#".join(messages)})


def create_tres_stub(state: TresState) -> FastAPI:
    app = FastAPI()

    async def handle(request: Request, endpoint: str) -> Response:
        failure = state.script.next_failure()
        if failure is not None:
            return failure
        form = await request.form()
        sep = str(form.get("separator") or "#")
        text = str(form.get("text") or "")
        values = text.split(sep) if text else []
        state.requests.append({"endpoint": endpoint, "values": values,
                               "fields": {k: str(v) for k, v in form.items() if k not in ("pw", "text")}})
        if form.get("un") != state.username or form.get("pw") != state.password:
            return _reply([100], ["Authentication failed."])
        if form.get("dn") != state.domain or form.get("pn") != state.project:
            return _reply([200], ["Unknown domain or project."])
        if not text:
            return _reply([999], ["Value cannot be null.\r\nParameter name: text"])
        if len(values) > state.max_values:
            return _reply([999], ["Too many values."])
        search_image = str(form.get("si", "")).upper() == "TRUE"
        codes, messages = [], []
        for value in values:
            if endpoint == "encryptpost":
                if not value.strip():
                    codes.append(310)
                    messages.append("The plain text that should be encrypted was not specified.")
                else:
                    codes.append(0)
                    messages.append(encrypt(value, search_image))
            else:
                plain = decrypt(value)
                codes.append(0 if plain is not None else 316)
                messages.append(plain if plain is not None else "Encrypted value is not valid.")
        return _reply(codes, messages)

    @app.post("/Service/encryptpost")
    async def encryptpost(request: Request) -> Response:
        return await handle(request, "encryptpost")

    @app.post("/Service/decryptpost")
    async def decryptpost(request: Request) -> Response:
        return await handle(request, "decryptpost")

    return app
