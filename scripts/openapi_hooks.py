"""Schemathesis hooks for scripts/check-openapi: sign tally's public requests like a client does.

Loaded with SCHEMATHESIS_HOOKS=scripts/openapi_hooks.py. One programmatic auth provider
(`@schemathesis.auth`, so schemathesis knows the credentials are explicit and its
`ignored_auth` check can probe the same request without them) signs:

- POST /v1/merchants/{merchant_id}/...: Standard Webhooks v1 with the merchant's secret
  (`webhook-id: msg_<random>`, `webhook-timestamp: <now>`, `webhook-signature: v1,<base64
  HMAC-SHA256 of "{id}.{timestamp}.{body}">`, key = the base64-decoded part after `whsec_`);
- POST /v1/partners/{partner_id}/deals: the same with the partner's secret;
- GET /pb/{merchant_id}: a signed postback URL (SPEC 4.2): `ts=<now>` and
  `sig=v1,<base64url HMAC-SHA256 of "GET\\n" + path + "\\n" + canonical query>`;
- GET /v1/partners/{partner_id}/...: the partner's own reads, a URL signed the same way
  with the partner's secret.

What is signed is exactly what `requests` will send: the request is prepared here the way
schemathesis' transport prepares it, and the signature covers its path, query and body bytes.
A request for another merchant or partner than the ones configured is signed with the
configured secret all the same, so tally must refuse it (401).

Environment:
  TALLY_OPENAPI_MERCHANT_SECRET_FILE  the merchant's secret file (data/secrets/<id>.whsec)
  TALLY_OPENAPI_PARTNER_SECRET_FILE   a file holding the partner's secret (whsec_...)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import uuid
from urllib.parse import quote, unquote_to_bytes, urlsplit

import requests
import schemathesis


def _key(env: str) -> bytes | None:
    path = os.environ.get(env)
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        secret = f.read().strip()
    if not secret.startswith("whsec_"):
        raise ValueError(f"{path}: not a whsec_ secret")
    return base64.b64decode(secret[len("whsec_") :])


def _prepared(case) -> requests.PreparedRequest:
    """The request as schemathesis' requests transport will send it."""
    kw = case.as_transport_kwargs()
    req = requests.Request(
        method=kw["method"],
        url=kw["url"],
        params=kw.get("params"),
        headers=kw.get("headers"),
        json=kw.get("json"),
        data=kw.get("data"),
    )
    return req.prepare()


def _body_bytes(prepared: requests.PreparedRequest) -> bytes:
    body = prepared.body
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def _sign_webhook(case, key: bytes) -> None:
    body = _body_bytes(_prepared(case))
    msg_id = "msg_" + uuid.uuid4().hex
    ts = str(int(time.time()))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    if case.headers is None:
        case.headers = {}
    case.headers["webhook-id"] = msg_id
    case.headers["webhook-timestamp"] = ts
    case.headers["webhook-signature"] = "v1," + base64.b64encode(mac).decode()


def _rfc3986(text: str) -> str:
    return quote(text, safe="-._~")


def _sign_postback(case, key: bytes) -> None:
    if case.query is None:
        case.query = {}
    case.query.pop("sig", None)
    case.query.pop("token", None)
    case.query["ts"] = str(int(time.time()))
    url = urlsplit(_prepared(case).url)
    # tally's reading of the query: split on '&' and the first '=', percent-decode (no '+'
    # to space), sort, re-encode per RFC 3986.
    params = []
    for pair in (p for p in url.query.split("&") if p):
        name, _, value = pair.partition("=")
        params.append(
            (unquote_to_bytes(name).decode("utf-8", "replace"), unquote_to_bytes(value).decode("utf-8", "replace"))
        )
    canonical = "&".join(f"{_rfc3986(n)}={_rfc3986(v)}" for n, v in sorted(params) if n != "sig")
    message = f"GET\n{url.path}\n{canonical}".encode()
    mac = hmac.new(key, message, hashlib.sha256).digest()
    case.query["sig"] = "v1," + base64.urlsafe_b64encode(mac).decode().rstrip("=")


@schemathesis.auth(refresh_interval=None, retry_on=[])
class TallySigner:
    """Signs tally's merchant API, partner API and GET postbacks; other operations get nothing."""

    def get(self, case, context):
        path = context.operation.path
        if path.startswith("/v1/merchants/") or path.startswith("/pb/"):
            key = _key("TALLY_OPENAPI_MERCHANT_SECRET_FILE")
        elif path.startswith("/v1/partners/"):
            key = _key("TALLY_OPENAPI_PARTNER_SECRET_FILE")
        else:
            return None
        return None if key is None else (path, key)

    def set(self, case, data, context):
        path, key = data
        if path.startswith("/pb/") or (path.startswith("/v1/partners/") and not path.endswith("/deals")):
            _sign_postback(case, key)
        else:
            _sign_webhook(case, key)


@schemathesis.hook
def map_body(context, body):
    """Keeps name resolution out of the run: tally vets a partner's `outbound.url` by
    resolving its host (SPEC 10), and generated host names would each become a DNS query.
    A name is replaced by a public IP literal (accepted without a lookup); literals stay."""
    outbound = body.get("outbound") if isinstance(body, dict) else None
    url = outbound.get("url") if isinstance(outbound, dict) else None
    if isinstance(url, str):
        parts = urlsplit(url)
        host = parts.hostname or ""
        literal = host.startswith("[") or host.replace(".", "").isdigit() or ":" in host
        if host and not literal:
            netloc = parts.netloc.replace(host, "8.8.8.8", 1) if host in parts.netloc else parts.netloc
            outbound["url"] = parts._replace(netloc=netloc).geturl()
    return body
