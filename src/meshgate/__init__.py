"""meshgate: an xDS control plane giving AI agents identity, egress policy and an audit trail."""

__version__ = "0.1.0"
