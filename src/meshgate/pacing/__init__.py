"""Pacing: global rate limits, budgets (reserve before admission, settle after) and fair queues.

`spec` is the contract between the xDS translation (what a route asks for) and the pacer service
that runs beside each gateway's Envoy (what it enforces); `store` is where counters live.
"""
