"""Key and module-name conversion between the original ACE-Step layout and diffusers.

Conversions are data: a list of (original, diffusers) fragment pairs applied in order. Module names
(`layers.3.self_attn.q_proj`) and state-dict keys (`decoder.layers.3.self_attn.q_proj.weight`) use
the same table; only the `decoder.` prefix differs.
"""

from __future__ import annotations

from sidestep.naming import DECODER_PREFIX

__all__ = [
    "DECODER_PREFIX",
    "NULL_CONDITION_KEY",
    "diffusers_to_original",
    "original_to_diffusers",
    "original_key_to_diffusers",
    "diffusers_key_to_original",
]

NULL_CONDITION_KEY = "null_condition_emb"

# Fragment renames, checked against diffusers' converter and a key-for-key parity run (docs/checkpoints.md).
# Each fragment is matched with surrounding dots so `o_proj` never hits `proj_out`.
_FRAGMENTS: tuple[tuple[str, str], ...] = (
    (".q_proj.", ".to_q."),
    (".k_proj.", ".to_k."),
    (".v_proj.", ".to_v."),
    (".o_proj.", ".to_out.0."),
    (".q_norm.", ".norm_q."),
    (".k_norm.", ".norm_k."),
    (".proj_in.1.", ".proj_in_conv."),
    (".proj_out.1.", ".proj_out_conv."),
)


def _rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    # Pad with dots so fragments at the start or end of a name match like inner ones.
    padded = f".{name}."
    for old, new in pairs:
        padded = padded.replace(old, new)
    return padded[1:-1]


def original_to_diffusers(name: str) -> str:
    """`layers.0.self_attn.q_proj` -> `layers.0.self_attn.to_q` (module names or keys without `decoder.`)."""
    return _rename(name, _FRAGMENTS)


def diffusers_to_original(name: str) -> str:
    """`layers.0.self_attn.to_out.0` -> `layers.0.self_attn.o_proj`; the inverse of `original_to_diffusers`."""
    return _rename(name, tuple((new, old) for old, new in _FRAGMENTS))


def original_key_to_diffusers(key: str) -> str | None:
    """A key of the original full-model checkpoint -> the transformer's key, or None if not a decoder key."""
    if not key.startswith(DECODER_PREFIX):
        return None
    return original_to_diffusers(key[len(DECODER_PREFIX) :])


def diffusers_key_to_original(key: str) -> str:
    """A transformer state-dict key -> the original checkpoint key (with `decoder.`)."""
    return DECODER_PREFIX + diffusers_to_original(key)
