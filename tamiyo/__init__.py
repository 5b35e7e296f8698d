"""Tamiyo's shared core: the ``tamiyo.v1`` contracts (generated from ``protos/``), the
configuration and limits, and the policy engine used by server, trainer and simulator."""
