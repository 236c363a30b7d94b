"""The demo's MCP agent: the official `mcp` SDK's client against https://mcp.demo.example/mcp,
unmodified. The gateway filters the tools it is shown and refuses calls its policy does not
allow, as tool results with the reason, which a model reads like any other answer.

Run it as `meshgate demo` prints: sidecar run --agent coder -- python demo/agent_mcp.py
"""

import asyncio

from mcp import Client


def text(result: object) -> str:
    return " ".join(getattr(c, "text", "") for c in getattr(result, "content", []))


async def main() -> None:
    async with Client("https://mcp.demo.example/mcp") as client:
        tools = await client.list_tools()
        print(f"1. tools/list shows only what coder may call: {[t.name for t in tools.tools]}")

        result = await client.call_tool("search_docs", {"query": "rate limits"})
        print(f"2. search_docs: {'refused' if result.is_error else 'allowed'}: {text(result)}")

        result = await client.call_tool("open_issue", {"repo": "acme/prod", "title": "hi"})
        print(f"3. open_issue in acme/prod: {'refused' if result.is_error else 'allowed'}:")
        print(f"   {text(result)}")

        result = await client.call_tool("delete_repo", {"repo": "demo/app"})
        print(f"4. delete_repo: {'refused' if result.is_error else 'allowed'}:")
        print(f"   {text(result)}")


asyncio.run(main())
