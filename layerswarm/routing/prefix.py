"""The hash chain that names a prompt's first blocks to peers, for their prefix cache.

Block `i` (tokens `16 i .. 16 i + 16`, `PREFIX_BLOCK_TOKENS`) is named by a hash of the name of
block `i - 1` and its own tokens, so one name stands for the whole prefix up to it, as vLLM's
automatic prefix caching keys its blocks. A peer keeps the KV pages of a session's blocks under
these names (scoped to this client and the session's layers), and a later session whose chain
starts alike takes them instead of computing them again (`peer/sessions.py`).

Only blocks before the prompt's last token are named: the last token's logits must be computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from layerswarm.swarm.messages import MAX_PREFIX_BLOCKS, PREFIX_BLOCK_TOKENS, PREFIX_HASH_BYTES


def prefix_hashes(tokens: Sequence[int]) -> tuple[bytes, ...]:
    """The chain's links for the full blocks of `tokens` before its last token."""
    blocks = min((len(tokens) - 1) // PREFIX_BLOCK_TOKENS, MAX_PREFIX_BLOCKS)
    links: list[bytes] = []
    last = b""
    for b in range(blocks):
        block = tokens[b * PREFIX_BLOCK_TOKENS : (b + 1) * PREFIX_BLOCK_TOKENS]
        h = hashlib.blake2b(last, digest_size=PREFIX_HASH_BYTES)
        h.update(b"".join(int(t).to_bytes(4, "little") for t in block))
        last = h.digest()
        links.append(last)
    return tuple(links)
