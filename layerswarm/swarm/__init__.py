"""Bytes and peers, no model: identity, wire protocol, transport, peer records, discovery."""
