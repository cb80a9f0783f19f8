"""Object stores: the local directory and S3 over HTTP (moto's server), one interface."""
import pytest

from fleetloop.buffer.store import LocalStore, ObjectNotFound, S3Store, StoreError, open_store
from fleetloop.config import S3Settings


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    settings = request.getfixturevalue("s3_settings")
    return S3Store(f"bucket-{tmp_path.name.lower().replace('_', '-')[:40]}", "fleet/prefix", settings)


def test_put_get_list_delete(store):
    store.put("episodes/r1/e1/chunk-00000.pb", b"abc")
    store.put("episodes/r1/e1/manifest.json", b"{}")
    store.put("policies/v1/manifest.json", b"{}")
    assert store.get("episodes/r1/e1/chunk-00000.pb") == b"abc"
    assert store.exists("episodes/r1/e1/manifest.json")
    assert sorted(store.list("episodes/")) == ["episodes/r1/e1/chunk-00000.pb", "episodes/r1/e1/manifest.json"]
    store.delete("policies/v1/manifest.json")
    assert not store.exists("policies/v1/manifest.json")
    with pytest.raises(ObjectNotFound):
        store.get("nope")


def test_overwrite_is_whole(store):
    store.put("k", b"x" * 1000)
    store.put("k", b"y" * 10)
    assert store.get("k") == b"y" * 10


@pytest.mark.parametrize("key", ["", "/abs", "a/../b"])
def test_bad_keys_rejected(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_open_store_uris(tmp_path, s3_settings):
    assert isinstance(open_store((tmp_path / "s").as_uri()), LocalStore)
    assert isinstance(open_store("s3://bkt-open/p", s3_settings), S3Store)
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("ftp://x/y")
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///x", s3_settings)


def test_unreachable_s3_is_a_store_error():
    from fleetloop.services import free_port
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                          create_bucket=False)
    s = S3Store("b", "", settings)
    with pytest.raises(StoreError):
        s.put("k", b"x")
