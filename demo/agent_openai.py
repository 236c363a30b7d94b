"""The demo's LLM agent: the official `openai` SDK as anyone writes it. Its default base URL
(https://api.openai.com/v1), no key of its own, nothing meshgate-specific: `meshgate sidecar run`
gives it HTTPS_PROXY and a CA bundle, and the gateway decides and injects the key.

Run it as `meshgate demo` prints: sidecar run --agent researcher -- python demo/agent_openai.py
"""

import openai

# The SDK insists on some key; this one is never sent upstream: the gateway replaces it.
client = openai.OpenAI(api_key="sk-agent-holds-no-key", max_retries=0)


def refusal(error: openai.APIStatusError) -> str:
    """The gateway's refusals are JSON that say why: `error`, and `reason` or the rule."""
    body = error.response.json()
    why = body.get("reason") or f"rule {body.get('route')}"
    return f"{error.status_code} {body.get('error')}: {why}"


print("1. a streamed chat completion (POST /v1/chat/completions)")
stream = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Say ok a few times."}],
    stream=True,
)
words = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
print(f"   allowed: 200, streamed {words!r}")
print("   (the provider answers only the gateway's key: ours was replaced on the way)")

print("2. client.files.list() (GET /v1/files: no rule of researcher's allows it)")
try:
    client.files.list()
    print("   allowed?!")
except openai.PermissionDeniedError as e:
    print(f"   denied: {refusal(e)}")

print("3. client.models.list(), three times (the rule allows 2 a minute)")
for attempt in range(1, 4):
    try:
        models = client.models.list()
        print(f"   call {attempt}: allowed: 200, {len(models.data)} models")
    except openai.RateLimitError as e:
        retry = e.response.headers.get("retry-after")
        print(f"   call {attempt}: rate limited: {refusal(e)}, retry-after {retry}s")
