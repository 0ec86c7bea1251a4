"""The search's storage (orchestrator/storage.py) against a local path, a file:// URI and
pyarrow's in-memory ``mock://`` filesystem (the object-store code path: one PUT per write,
no directories, no rename). The S3 path is tested end to end in test_e2e_s3.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from orchestrator.errors import HaqtuneError
from orchestrator.storage import check_storage, is_uri, join, local_directory, open_storage


@pytest.mark.parametrize(("location", "parts", "expected"), [
    ("/runs", ("id", "config.yaml"), "/runs/id/config.yaml"),
    ("s3://bucket/runs", ("id",), "s3://bucket/runs/id"),
    ("s3://bucket", ("id",), "s3://bucket/id"),
    ("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", ("id", "x.json"),
     "s3://bucket/runs/id/x.json?endpoint_override=127.0.0.1:9000&scheme=http"),
    ("file:///tmp/runs", ("id",), "file:///tmp/runs/id"),
    ("gs://bucket/a/", ("b",), "gs://bucket/a/b"),
])
def test_join_keeps_scheme_and_query(location, parts, expected):
    assert join(location, *parts) == expected


def test_is_uri():
    assert is_uri("s3://b/x") and is_uri("file:///x")
    assert not is_uri("haqtune_runs") and not is_uri(Path("/tmp/s3:/b"))


def test_uri_name_and_parent_keep_the_query():
    query = "endpoint_override=127.0.0.1:9&scheme=http"  # opening connects to nothing
    runs = open_storage(f"s3://bucket/runs?{query}")
    search = runs / "haq-1"
    assert str(search) == f"s3://bucket/runs/haq-1?{query}"
    assert search.name == "haq-1" and search.parent == runs
    assert search.path == "bucket/runs/haq-1"  # the path on the filesystem: no scheme, no query


def _roots(tmp_path):
    return {"local": open_storage(tmp_path / "local"), "file": open_storage(f"file://{tmp_path}/file"),
            "mock": open_storage("mock://bucket/runs")}


@pytest.mark.parametrize("kind", ["local", "file", "mock"])
def test_read_write_list(tmp_path, kind):
    root = _roots(tmp_path)[kind]
    assert root.is_local == (kind != "mock")
    search = root / "search-1"
    assert not search.exists() and list(search.iterdir()) == []
    search.mkdir(exist_ok=False)
    with pytest.raises(FileExistsError):
        search.mkdir(exist_ok=False)
    (search / "config.yaml").write_text("seed: 1\n")
    (search / "config.yaml").write_text("seed: 2\n")  # replaced whole
    (search / "sub" / "blob.bin").write_bytes(b"\x00\x01")  # parents are created as needed
    assert (search / "config.yaml").read_text() == "seed: 2\n"
    assert (search / "config.yaml").is_file() and (search / "sub").is_dir()
    assert not (search / "sub").is_file() and not (search / "missing").exists()
    assert [p.name for p in search.iterdir()] == ["config.yaml", "sub"]
    assert search.file_sizes() == {"config.yaml": 8}
    assert (search / "sub" / "blob.bin").read_bytes() == b"\x00\x01"
    if root.is_local:  # atomic writes leave no temp file behind
        assert sorted(p.name for p in Path(search.path).iterdir()) == ["config.yaml", "sub"]
    with pytest.raises(FileNotFoundError):
        (search / "missing").read_text()


@pytest.mark.parametrize("kind", ["local", "file", "mock"])
def test_upload_download(tmp_path, kind):
    root = _roots(tmp_path)[kind]
    source = tmp_path / "model.pt"
    source.write_bytes(b"w" * 3_000_000)  # several copy chunks
    (root / "_cache" / "model.pt").upload(source)
    back = (root / "_cache" / "model.pt").download(tmp_path / "back" / "model.pt")
    assert back == tmp_path / "back" / "model.pt" and back.read_bytes() == source.read_bytes()
    assert [p.name for p in back.parent.iterdir()] == ["model.pt"]


def test_local_directory_is_the_directory_itself_when_local(tmp_path):
    cache = open_storage(tmp_path / "runs") / "_cache"
    with local_directory(cache) as local:
        assert local == tmp_path / "runs" / "_cache" and local.is_dir()
        (local / "reference-1.pt").write_bytes(b"1")
    assert (cache / "reference-1.pt").read_bytes() == b"1"


def test_local_directory_of_a_remote_directory_uploads_new_and_changed_files():
    cache = open_storage("mock://bucket/runs") / "_cache"
    (cache / "kept.pt").write_bytes(b"old")
    (cache / "changed.pt").write_bytes(b"old")
    with local_directory(cache) as local:
        assert sorted(p.name for p in local.iterdir()) == ["changed.pt", "kept.pt"]  # fetched
        assert (local / "kept.pt").read_bytes() == b"old"
        (local / "new.pt").write_bytes(b"new")
        (local / "changed.pt").write_bytes(b"longer")
    assert not local.exists()  # a temp copy, removed
    assert cache.file_sizes() == {"changed.pt": 6, "kept.pt": 3, "new.pt": 3}
    assert (cache / "new.pt").read_bytes() == b"new" and (cache / "changed.pt").read_bytes() == b"longer"
    with pytest.raises(RuntimeError), local_directory(cache) as local:  # a failed block uploads nothing
        (local / "partial.pt").write_bytes(b"x")
        raise RuntimeError("failed")
    assert not (cache / "partial.pt").exists()


@pytest.mark.parametrize("location", ["foo://bucket/runs", "s3x://b/x"])
def test_unknown_scheme_is_one_clear_error(location):
    with pytest.raises(HaqtuneError) as err:
        check_storage(location)
    message = str(err.value)
    assert message.startswith(f"storage_dir: cannot use {location!r}")
    assert "s3://bucket/path" in message and "\n" not in message


def test_credentials_in_the_uri_are_refused_without_echoing_them():
    with pytest.raises(HaqtuneError) as err:
        open_storage("s3://AKIAEXAMPLE:sup3rsecret@bucket/runs")
    assert "holds credentials" in str(err.value) and "sup3rsecret" not in str(err.value)


def test_storage_pickles_as_its_location(tmp_path):
    storage = open_storage(f"file://{tmp_path}") / "search-1"
    again = pickle.loads(pickle.dumps(storage))
    assert again == storage and again.path == f"{tmp_path}/search-1" and again.is_local


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = check_storage("haqtune_runs")
    assert str(storage) == str(tmp_path / "haqtune_runs") and not storage.exists()  # nothing written


def test_failed_trial_error_file_is_named_in_its_storage(tmp_path):
    """The progress line of a failed trial names its error file where Tune stored it: a
    bucket URI for remote storage, a plain path for a local one (never ``s3:/...``)."""
    import pyarrow.fs

    from orchestrator.callbacks import error_summary

    local = tmp_path / "staging" / "error.txt"
    local.parent.mkdir()
    local.write_text("Traceback ...\nRuntimeError: injected fault\n")
    s3 = pyarrow.fs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http")  # connects to nothing

    class Trial:  # the attributes of ray.tune.experiment.Trial that error_summary reads
        def __init__(self, path, fs):
            self.error_file, self.path = str(local), path
            self.storage = type("StorageContext", (), {"storage_filesystem": fs})()

    last, stored = error_summary(Trial("bucket/runs/haq-1/trial_a", s3))
    assert last == "RuntimeError: injected fault"
    assert stored == "s3://bucket/runs/haq-1/trial_a/error.txt"
    _, stored = error_summary(Trial(f"{tmp_path}/runs/haq-1/trial_a", pyarrow.fs.LocalFileSystem()))
    assert stored == f"{tmp_path}/runs/haq-1/trial_a/error.txt"
