"""Random JSON schemas for constrained-decoding tests (hypothesis strategies).

:data:`SCHEMAS` draws small object schemas whose every instance has a bounded length, so a random model
always completes one. Strategies only: no engine, no assertions.
"""

from __future__ import annotations

from hypothesis import strategies as st


def object_schema(props: dict) -> dict:
    """An object schema whose every property is required and no other is allowed."""
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


#: Bounded JSON schemas (every instance has a bounded length, so a random model always completes one).
LEAVES = st.one_of(
    st.just({"type": "integer", "minimum": -50, "maximum": 50}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 5).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.text("abxyz", min_size=1, max_size=3), min_size=1, max_size=3, unique=True).map(
        lambda xs: {"enum": xs}),
)
SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), inner, min_size=1, max_size=3).map(object_schema),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 2)),
    ),
    max_leaves=5,
).map(lambda s: s if s.get("type") == "object" else object_schema({"v": s}))
