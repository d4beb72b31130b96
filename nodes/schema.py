"""Small helpers for node schemas shared by the node modules."""

from __future__ import annotations


def advanced(inp):
    """Mark a V3 input as a power-user option (the frontend folds ``advanced`` inputs away where it supports it)."""
    inp.extra_dict = {**inp.extra_dict, "advanced": True}
    return inp


# Words people type in the node search (frontends that read ``search_aliases``, 1.5x and newer).
SEARCH_ALIASES = {
    "WithAnyoneAdapterLoader": ["identity adapter", "withanyone model", "face id", "pulid", "instantid"],
    "WithAnyoneFaceAnalyzerLoader": ["insightface", "antelopev2", "face detector", "arcface"],
    "WithAnyoneSiglipLoader": ["siglip", "clip vision", "image encoder"],
    "WithAnyoneFaceExtract": ["face", "crop face", "reference face", "insightface"],
    "WithAnyoneIdentityEncode": ["identity", "face embedding", "multi-person", "people"],
    "WithAnyoneLayout": ["face boxes", "regions", "multi-person", "bbox", "mask"],
    "WithAnyoneApply": ["identity", "face", "pulid", "instantid", "ipadapter", "multi-person", "consistent character"],
    "WithAnyoneSchedule": ["sigmas", "scheduler", "flux shift"],
    "WithAnyoneSampler": ["identity", "ksampler", "multi-person", "face", "consistent character"],
    "WithAnyoneIdentityMetrics": ["copy-paste", "face similarity", "multiid-bench", "evaluation"],
    "WithAnyoneFaceEditPrepare": ["kontext", "face edit", "face swap", "group photo", "blur faces"],
    "WithAnyoneArcFaceIdentities": ["kontext", "arcface", "identity"],
    "WithAnyoneSaveIdentity": ["save face", "save person", "identity"],
    "WithAnyoneLoadIdentity": ["load face", "load person", "identity"],
}


def with_search_aliases(nodes: list) -> list:
    """Add ``search_aliases`` to each node's /object_info entry (ComfyUI 0.3.75's V3 schema has no field for it)."""
    for node in nodes:
        aliases = SEARCH_ALIASES.get(node.define_schema().node_id)
        if not aliases or "_withanyone_base_info" in node.__dict__:  # once per class
            continue
        base = node.GET_NODE_INFO_V1.__func__
        node._withanyone_base_info = base

        def info(cls, _base=base, _aliases=tuple(aliases)):
            entry = _base(cls)
            entry["search_aliases"] = list(_aliases)
            return entry

        node.GET_NODE_INFO_V1 = classmethod(info)
    return nodes
