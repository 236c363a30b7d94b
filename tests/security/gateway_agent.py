"""Stdlib code the hostile agents of tests/security/test_gateway_*.py run (prepended to scripts).

`send` speaks HTTP/1.1 to the agent's sidecar with an absolute URI, exactly as given: no client
library normalises the path or fixes the headers on the attacker's behalf.
"""

AGENT_LIB = r"""
import http.client, json, os, urllib.parse

_PROXY = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])


def send(method, url, body=None, headers=None, chunked=False):
    conn = http.client.HTTPConnection(_PROXY.hostname, _PROXY.port, timeout=30)
    headers = dict(headers or {})
    if isinstance(body, str):
        body = body.encode()
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        conn.request(method, url, body=iter([body]), headers=headers, encode_chunked=True)
    else:
        conn.request(method, url, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode(errors="replace")[:300]
    return {
        "status": resp.status,
        "headers": {k.lower(): v for k, v in resp.getheaders()},
        "body": parsed,
    }
"""
