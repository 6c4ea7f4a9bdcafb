"""The store's metadata as one typed record: ``CacheMeta``, the group attribute ``logitcache`` (docs/format.md).

Every module reads the metadata through this record, never through string keys: what a cache is (its identity),
what it was built on (its inputs, for the compatibility check), how its arrays are laid out, and the digest that
detects an edited attribute. ``to_json``/``from_json`` are exact inverses on what a build writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from logitcache.errors import LogitcacheError
from logitcache.augment.mix import Mix

DIGEST_KEY = "metadata_sha256"
VIEW_RULE = "epoch e uses view e % num_views"


@dataclass(frozen=True)
class EncodingRecord:
    """The encoding's registry name and the parameters it rebuilds itself from (``Encoding.from_store``)."""

    name: str
    params: dict[str, Any]


@dataclass(frozen=True)
class AugmentRecord:
    """The augmentation: its CLI spec (None for a Python transform), ``repr``, the replayed views' fingerprint, and
    its structure as plain data (``fingerprint.augment_structure``; None in stores written before it was recorded,
    which are compared by their replayed views alone)."""

    spec: str | None
    repr: str
    fingerprint: list[dict[str, Any]]
    structure: Any = None


@dataclass(frozen=True)
class TeacherRecord:
    """The teacher: its spec, class name and the sha256 of its state dict."""

    spec: str | None
    class_name: str
    sha256: str


@dataclass(frozen=True)
class DatasetRecord:
    """The dataset: its spec, length, and hashes of all labels and of a few samples spread over it."""

    length: int
    labels_sha256: str
    samples_sha256: str
    spec: str | None = None

    def same_data(self, other: "DatasetRecord") -> bool:
        """The same samples in the same order, whatever spec named them."""
        return dataclasses.replace(self, spec=None) == dataclasses.replace(other, spec=None)


@dataclass(frozen=True)
class TableRecord:
    """An encoding's per-cache table: the array's name, the samples it was fitted on, the digest of its bytes."""

    array: str
    probe: int
    sha256: str


@dataclass(frozen=True)
class Inputs:
    """What a cache was built on, as the compatibility check compares it: the dataset, the replayed views'
    fingerprint and the mixing."""

    dataset: DatasetRecord
    fingerprint: list[dict[str, Any]]
    mix: Mix = field(default_factory=Mix)
    structure: Any = None


@dataclass(frozen=True)
class CacheMeta:
    """The metadata of a store (docs/format.md, "Metadata"). ``inner_chunk_rows``, ``mix`` and ``table`` are written
    only when used, so a store without them has no such key."""

    format_version: int
    num_samples: int
    num_views: int
    num_classes: int
    chunk_rows: int
    batch_size: int
    seed: int
    codec: str
    encoding: EncodingRecord
    values: str
    temperature: float
    augment: AugmentRecord
    teacher: TeacherRecord
    dataset: DatasetRecord
    versions: dict[str, str]
    created: str
    view_rule: str = VIEW_RULE
    precision: str = "fp32"  # the teacher pass's (absent in stores built before it was recorded: fp32)
    inner_chunk_rows: int | None = None
    mix: Mix = field(default_factory=Mix)
    table: TableRecord | None = None

    # Settings whose change makes an existing cache a different cache (a resume is refused, --overwrite needed).
    IDENTITY = (
        "num_samples", "num_views", "num_classes", "chunk_rows", "inner_chunk_rows", "batch_size", "seed",
        "encoding", "codec", "mix", "precision",
    )  # fmt: skip

    @staticmethod
    def keys() -> list[str]:
        """The attribute's keys, as docs/format.md lists them (the digest included)."""
        return [f.name for f in dataclasses.fields(CacheMeta)] + [DIGEST_KEY]

    def to_json(self) -> dict[str, Any]:
        """The attribute as plain JSON, without its digest."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "mix":
                value = value.to_meta()
            elif f.name == "teacher":
                value = {"spec": value.spec, "class": value.class_name, "sha256": value.sha256}
            elif f.name == "dataset":
                value = {"spec": value.spec, "length": value.length, "labels_sha256": value.labels_sha256,
                         "samples_sha256": value.samples_sha256}  # fmt: skip
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a record, not a class
                value = dataclasses.asdict(value)
                if f.name == "augment" and value["structure"] is None:
                    del value["structure"]
            if value is not None or f.name not in ("inner_chunk_rows", "mix", "table"):
                out[f.name] = value
        return out

    def attribute(self) -> dict[str, Any]:
        """What a build stores: the JSON with its digest."""
        body = self.to_json()
        return {**body, DIGEST_KEY: json_digest(body)}

    @classmethod
    def from_json(cls, attrs: dict[str, Any], where: str = "the cache") -> "CacheMeta":
        """The record of a stored attribute; a clear error naming the key when one is missing or malformed."""

        def get(key: str, default: Any = LogitcacheError) -> Any:
            if key in attrs:
                return attrs[key]
            if default is LogitcacheError:
                raise LogitcacheError(f"{where}: the metadata has no '{key}' (damaged, or not written by logitcache)")
            return default

        try:
            teacher, dataset, augment, encoding = get("teacher"), get("dataset"), get("augment"), get("encoding")
            table = get("table", None)
            return cls(
                format_version=int(get("format_version")),
                num_samples=int(get("num_samples")),
                num_views=int(get("num_views")),
                num_classes=int(get("num_classes")),
                chunk_rows=int(get("chunk_rows")),
                batch_size=int(get("batch_size")),
                seed=int(get("seed")),
                codec=str(get("codec")),
                encoding=EncodingRecord(str(encoding["name"]), dict(encoding["params"])),
                values=str(get("values")),
                temperature=float(get("temperature")),
                view_rule=str(get("view_rule", VIEW_RULE)),
                precision=str(get("precision", "fp32")),
                augment=AugmentRecord(
                    augment["spec"], augment["repr"], list(augment["fingerprint"]), augment.get("structure")
                ),
                teacher=TeacherRecord(teacher.get("spec"), teacher["class"], teacher["sha256"]),
                dataset=DatasetRecord(
                    int(dataset["length"]), dataset["labels_sha256"], dataset["samples_sha256"], dataset.get("spec")
                ),
                versions=dict(get("versions")),
                created=str(get("created")),
                inner_chunk_rows=get("inner_chunk_rows", None),
                mix=Mix.from_meta(get("mix", None)),
                table=TableRecord(table["array"], int(table["probe"]), table["sha256"]) if table else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LogitcacheError(f"{where}: the metadata is malformed ({type(e).__name__}: {e})") from None

    def digest(self) -> str:
        return json_digest(self.to_json())

    def identity(self) -> dict[str, Any]:
        """The settings that make a cache this cache (compared by ``build --resume``)."""
        body = self.to_json()
        return {key: body.get(key) for key in self.IDENTITY}

    def inputs(self) -> Inputs:
        """What the cache was built on, for ``compat.differences``."""
        return Inputs(self.dataset, self.augment.fingerprint, self.mix, self.augment.structure)

    def with_table(self, table: TableRecord) -> "CacheMeta":
        return dataclasses.replace(self, table=table)


def json_digest(body: dict[str, Any]) -> str:
    """sha256 of a JSON object in canonical form (sorted keys, no spaces), the digest key itself left out."""
    body = {k: v for k, v in body.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
