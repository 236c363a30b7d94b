"""Local stand-ins for the upstreams agents call (an LLM provider, an MCP server), for tests,
benchmarks and `meshgate demo`."""
