"""The committed JSON Schemas in docs/schemas must match the models."""

from __future__ import annotations

from pathlib import Path

from schemas.export import all_schemas, render

DOCS = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def test_committed_schemas_match_the_models() -> None:
    expected = {f"{name}.json": render(schema) for name, schema in all_schemas().items()}
    committed = {p.name: p.read_bytes() for p in DOCS.glob("*.json")}
    assert committed.keys() == expected.keys(), "run: nvo3 schema export docs/schemas"
    stale = [name for name, data in expected.items() if committed[name] != data]
    assert not stale, f"stale schemas {stale}; run: nvo3 schema export docs/schemas"


def test_committed_lifecycle_diagram_matches_the_transition_table() -> None:
    from schemas.export import lifecycle_doc

    committed = (DOCS.parent / "lifecycle.md").read_text()
    assert committed == lifecycle_doc(), "run: nvo3 schema export docs/schemas"


def test_protocol_and_architecture_embed_the_generated_lifecycle_diagram() -> None:
    from schemas.export import DIAGRAM_DOCS, with_diagram

    for name in DIAGRAM_DOCS:
        text = (DOCS.parent / name).read_text()
        assert with_diagram(text) == text, f"{name}: run nvo3 schema export docs/schemas"
