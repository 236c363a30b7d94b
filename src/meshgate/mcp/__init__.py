"""MCP at the gateway: strict JSON-RPC reading, canonical arguments, tool-argument decisions.

Pure (no I/O): the pacer beside each gateway calls these per request, so everything that can
be prepared ahead (compiled rules, regexes) is prepared once and cached.
"""
