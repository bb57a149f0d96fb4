import json
from importlib import resources

import pyarrow as pa
import pytest

from fastserve.pipeline import schemas

FILES = sorted(
    p.name for p in resources.files("fastserve.data_schemas").iterdir() if p.name.endswith(".json")
)


def test_every_table_is_declared():
    assert {"corpus.v1.json", "sentiment.v1.json", "rejected.v1.json"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_schema_files_are_versioned_and_documented(name):
    raw = json.loads(resources.files("fastserve.data_schemas").joinpath(name).read_text())
    assert name == f"{raw['name']}.v{raw['version']}.json"
    assert raw["doc"].strip()
    for f in raw["fields"]:
        assert f["doc"].strip(), f"{name}: field {f['name']} has no doc line"
    sized = {f["name"]: 3 for f in raw["fields"] if f["type"].startswith("fixed_size")}
    table = schemas.load(raw["name"], raw["version"]).sized(**sized)
    assert isinstance(table.arrow, pa.Schema)
    assert table.arrow.names == [f["name"] for f in raw["fields"]]
    assert table.arrow.metadata[b"fastserve.schema"] == f"{raw['name']}.v{raw['version']}".encode()


def test_corpus_text_is_required_and_id_optional():
    corpus = schemas.load("corpus")
    assert corpus.field("text").required and not corpus.field("id").required
