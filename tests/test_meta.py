"""The store's metadata is one typed record: docs/format.md lists exactly its keys, and it reads back what a build
wrote, to the byte of its digest."""

import json
import re
from pathlib import Path

import pytest
import zarr

import helpers
import logitcache as lc
from logitcache.errors import LogitcacheError
from logitcache.store.meta import CacheMeta

FORMAT = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def _documented_keys() -> list[str]:
    text = FORMAT.read_text()
    section = text.split("## Metadata", 1)[1].split("\n## ", 1)[0]
    keys = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            keys += re.findall(r"`([a-z_0-9]+)`", first)
    return keys


def test_the_format_documents_exactly_the_records_keys():
    documented = _documented_keys()
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(CacheMeta.keys())


@pytest.mark.parametrize("build", [dict(encoding="topk8", k=4), dict(encoding="full", mix="cutmix", inner=8)])
def test_a_builds_attribute_reads_back_to_the_same_json_and_digest(tmp_path, build):
    tiny = helpers.tiny_dataset()
    mix = lc.Mix(build.pop("mix")) if "mix" in build else None
    inner = build.pop("inner", None)
    out = tmp_path / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), views=2, chunk_rows=32,
                   inner_chunk_rows=inner, batch_size=16, workers=0, progress=False, mix=mix, **build)  # fmt: skip
    stored = json.loads(json.dumps(dict(zarr.open_group(str(out), mode="r").attrs["logitcache"])))
    meta = CacheMeta.from_json(stored)
    assert meta.attribute() == stored  # every key, the digest included
    assert lc.open_cache(out).meta == meta
    assert (meta.table is not None) == (build["encoding"] == "topk8")
    assert meta.inner_chunk_rows == inner and meta.mix == (mix or lc.Mix())
    assert ("mix" in stored) == (mix is not None) and ("inner_chunk_rows" in stored) == (inner is not None)


def test_a_missing_key_is_named(tmp_path):
    tiny = helpers.tiny_dataset()
    out = tmp_path / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), views=1, chunk_rows=64,
                   encoding="full", batch_size=32, workers=0, progress=False)  # fmt: skip
    stored = dict(zarr.open_group(str(out), mode="r").attrs["logitcache"])
    del stored["seed"]
    with pytest.raises(LogitcacheError, match="no 'seed'"):
        CacheMeta.from_json(stored, "c")
    stored["seed"], stored["teacher"] = 0, {"spec": None}
    with pytest.raises(LogitcacheError, match="malformed"):
        CacheMeta.from_json(stored, "c")


def _cli_defaults(command: str) -> dict:
    import typer.main

    from logitcache.cli import app

    click_command = typer.main.get_command(app).commands[command]
    return {p.name: p.default for p in click_command.params}


def test_build_options_and_defaults_come_from_build_config_alone():
    import dataclasses
    import inspect

    from logitcache.config import BuildConfig

    cli = _cli_defaults("build")
    fields = {f.name: f for f in dataclasses.fields(BuildConfig) if f.metadata.get("cli", True)}
    for name, f in fields.items():
        key = "quiet" if name == "progress" else name
        assert key in cli, name
        if f.default is not dataclasses.MISSING and name not in ("teacher", "dataset", "out", "progress"):
            assert cli[key] == f.default, name  # required ones have no default; --quiet inverts progress
    # the Python API takes the same defaults: one source (the CLI's --views and build_cache's views agree)
    params = inspect.signature(lc.build_cache).parameters
    shared = [name for name in params if name in fields and name not in ("teacher", "dataset", "out", "augment", "mix")]
    assert len(shared) >= 12
    for name in shared:
        assert params[name].default == fields[name].default, name
    assert params["views"].default == cli["views"] == BuildConfig.views
