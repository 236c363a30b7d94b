"""Local stand-ins for the upstreams agents call: an LLM provider (and, later, an MCP server)."""
