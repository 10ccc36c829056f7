"""The attention sites and the one map from a site to its modules and its two sides.

A site is where attention happens: `encoder.self`, `decoder.self`, `decoder.cross`. Each names the stack and the
attention module it lives in (hook names are module paths: `decoder.layers.1.cross_attn.hook_k`) and whose
positions its queries and its keys belong to (cross-attention: queries on the target, keys on the source).
Extraction, comparison, figures and sources all read this table; no other module spells a site out again.
No heavy imports here: the CLI and experiment validation use it before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    name: str        # "decoder.cross"
    stack: str       # "encoder" | "decoder"
    attn: str        # the attention module's name inside a layer: "self_attn" | "cross_attn"
    query_side: str  # "src" | "tgt": whose positions q, z, attn_out and layer_out rows belong to
    key_side: str    # "src" | "tgt": whose positions k and v rows belong to

    def side(self, kind: str) -> str:
        """The side whose positions rows of `kind` (q, k, v, z, attn_out, layer_out) belong to."""
        return self.key_side if kind in KEY_KINDS else self.query_side

    def hook(self, layer: int, kind: str) -> str:
        """This model's hook point for `kind` at `layer`, e.g. `decoder.layers.0.cross_attn.hook_k`; `kind` is q, k,
        v, z, attn_out, pattern or layer_out (the layer's output, shared by the sites of one stack)."""
        if kind == "layer_out":
            return f"{self.stack}.layers.{layer}.hook_out"
        return f"{self.stack}.layers.{layer}.{self.attn}.hook_{kind}"


SITE = {s.name: s for s in (Site("encoder.self", "encoder", "self_attn", "src", "src"),
                            Site("decoder.self", "decoder", "self_attn", "tgt", "tgt"),
                            Site("decoder.cross", "decoder", "cross_attn", "tgt", "src"))}
SITES = tuple(SITE)
KINDS = ("q", "k", "v", "z", "attn_out", "layer_out")
ALIASES = {"x1": "z", "x4": "attn_out"}  # the study's names
KEY_KINDS = ("k", "v")                   # rows at the key side's positions
HEADED_KINDS = ("q", "k", "v", "z")      # (batch, pos, head, d_head); the others are (batch, pos, d_model)
SIDE_NAMES = {"src": "source", "tgt": "target"}
