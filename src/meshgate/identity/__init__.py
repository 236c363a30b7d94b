"""Workload identity: who a node is, proven to the control plane and then to its peers.

tokens.py: signed join tokens a node presents before it gets any config or key.
ca.py: the built-in CA (root + rotating intermediate) whose root bundle peers trust.
certs.py: short-lived SPIFFE X.509 SVIDs (spiffe://<trust-domain>/<kind>/<name>), so the
identity in a verified client certificate can replace header-based identity.
"""
