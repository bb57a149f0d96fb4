"""Load the Arrow schemas declared in `data_schemas/` (the only place a schema is written down)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import pyarrow as pa

_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<float32>": pa.list_(pa.float32()),
    "list<int64>": pa.list_(pa.int64()),
    "map<string,float32>": pa.map_(pa.string(), pa.float32()),
    "list<struct<answer:string,score:float32,start:int64,end:int64>>": pa.list_(
        pa.struct(
            [
                ("answer", pa.string()),
                ("score", pa.float32()),
                ("start", pa.int64()),
                ("end", pa.int64()),
            ]
        )
    ),
}
# Types whose size the data decides (the model's dimension): a task gives it (TableSchema.sized).
_SIZED = {"fixed_size_list<float32>": pa.float32()}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    nullable: bool
    required: bool
    doc: str


@dataclass(frozen=True)
class TableSchema:
    """One declared table: its name, version and fields, convertible to an Arrow schema."""

    name: str
    version: int
    doc: str
    fields: tuple[FieldSpec, ...]
    sizes: tuple[tuple[str, int], ...] = ()
    """The list size of each fixed-size field, as the task knows it (embed: the model's hidden
    size); see `sized`."""

    def sized(self, **sizes: int) -> TableSchema:
        """This schema with the sizes of its fixed-size list fields."""
        return replace(self, sizes=tuple(sorted({**dict(self.sizes), **sizes}.items())))

    def _type(self, f: FieldSpec) -> pa.DataType:
        if f.type in _SIZED:
            size = dict(self.sizes).get(f.name)
            if size is None:
                raise ValueError(f"{self.ref}: field {f.name!r} needs its size (TableSchema.sized)")
            return pa.list_(_SIZED[f.type], size)
        return _TYPES[f.type]

    @property
    def arrow(self) -> pa.Schema:
        return pa.schema(
            [pa.field(f.name, self._type(f), nullable=f.nullable) for f in self.fields],
            metadata={"fastserve.schema": f"{self.name}.v{self.version}"},
        )

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def ref(self) -> str:
        """Where a user reads this schema: `data_schemas/<name>.v<version>.json`."""
        return f"data_schemas/{self.name}.v{self.version}.json"


def versions(name: str) -> list[int]:
    """The declared versions of table `name`, ascending."""
    prefix = f"{name}.v"
    return sorted(
        int(p.name[len(prefix) : -len(".json")])
        for p in resources.files("fastserve.data_schemas").iterdir()
        if p.name.startswith(prefix) and p.name.endswith(".json")
    )


def latest(name: str) -> int:
    """The newest declared version of table `name` (what FastServe writes now)."""
    return versions(name)[-1]


def as_version(table: pa.Table, older: TableSchema) -> pa.Table:
    """`table`, written in a newer version of `older`'s table, as `older` (its fields, in its
    order and types: a later version adds fields or widens a type, so this drops and casts)."""
    target = older.arrow
    return table.select(target.names).cast(target)


@cache
def load(name: str, version: int | None = None) -> TableSchema:
    """The declared schema `name` at `version` (default: the newest), from
    `data_schemas/<name>.v<version>.json`."""
    version = latest(name) if version is None else version
    text = resources.files("fastserve.data_schemas").joinpath(f"{name}.v{version}.json").read_text()
    raw = json.loads(text)
    fields = tuple(
        FieldSpec(
            name=f["name"],
            type=f["type"],
            nullable=bool(f.get("nullable", True)),
            required=bool(f.get("required", True)),
            doc=f["doc"],
        )
        for f in raw["fields"]
    )
    for f in fields:
        if f.type not in _TYPES and f.type not in _SIZED:
            raise ValueError(
                f"{name}.v{version}.json: field {f.name!r} has unknown type {f.type!r}"
            )
    return TableSchema(raw["name"], int(raw["version"]), raw["doc"], fields)
