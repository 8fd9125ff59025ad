"""StorageConfig, URI helpers, redaction and the package's error types."""

from __future__ import annotations

import pickle

import fsspec
import pytest
import rasterio
import s3fs
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from uhr.errors import SceneError, StorageError, UhrError
from uhr.storage import DEFAULT_GDAL_OPTIONS, StorageConfig, absolute_uri, is_remote, join_uri, redact, to_gdal_path
from uhr.testing.s3_server import FAKE_ACCESS_KEY_ID, FAKE_SHAPED_KEY_ID

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def clean_env(monkeypatch):
    for name in AWS_VARS + ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_endpoint_and_region_come_from_the_aws_sdk_variables(clean_env):
    assert StorageConfig().endpoint_url is None and StorageConfig().region is None
    clean_env.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert StorageConfig().endpoint_url == "http://minio.internal:9000"
    assert StorageConfig().region == "eu-west-1"
    # The S3-specific variable wins over the general one, as in the AWS SDKs.
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org/")
    clean_env.setenv("AWS_REGION", "eu-central-1")
    assert StorageConfig().endpoint_url == "https://s3.example.org"
    assert StorageConfig().region == "eu-central-1"
    assert StorageConfig(endpoint_url="http://127.0.0.1:5000").endpoint_url == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("minio:9000", "http\\(s\\)://host"),
        ("ftp://host", "http\\(s\\)://host"),
        ("http://host:9000/prefix", "no path"),
        ("http://uhr-not-a-real-key:uhr-not-a-real-secret@host:9000", "must not carry credentials"),
    ],
)
def test_bad_endpoints_are_rejected_without_echoing_secrets(clean_env, endpoint, message):
    with pytest.raises(ValidationError, match=message) as caught:
        StorageConfig(endpoint_url=endpoint)
    assert "secret" not in str(caught.value).replace("must not carry credentials", "")


def test_gdal_env_translates_the_endpoint_and_keeps_user_overrides(clean_env):
    env = StorageConfig(endpoint_url="http://127.0.0.1:5000", region="us-east-1").gdal_env()
    assert env["AWS_S3_ENDPOINT"] == "127.0.0.1:5000"
    assert env["AWS_HTTPS"] == "NO" and env["AWS_VIRTUAL_HOSTING"] == "FALSE" and env["AWS_REGION"] == "us-east-1"
    for name, value in DEFAULT_GDAL_OPTIONS.items():
        assert env[name] == value
    assert env["GDAL_CACHEMAX"] == 256 * 1024 * 1024
    secure = StorageConfig(endpoint_url="https://s3.example.org", anonymous=True).gdal_env()
    assert secure["AWS_HTTPS"] == "YES" and secure["AWS_NO_SIGN_REQUEST"] == "YES"
    assert secure["GS_NO_SIGN_REQUEST"] == secure["AZURE_NO_SIGN_REQUEST"] == "YES"  # public gs:// and az:// too
    overrides = {"VSI_CACHE_SIZE": "1048576", "AWS_VIRTUAL_HOSTING": "TRUE"}
    tuned = StorageConfig(gdal_options=overrides, endpoint_url="http://h:1").gdal_env()
    assert tuned["VSI_CACHE_SIZE"] == "1048576" and tuned["AWS_VIRTUAL_HOSTING"] == "TRUE"
    assert "AWS_S3_ENDPOINT" not in StorageConfig().gdal_env()
    # rasterio accepts the whole mapping as it is.
    with rasterio.Env(**tuned):
        pass


def test_gdal_options_refuse_credentials_and_the_cache_size(clean_env):
    with pytest.raises(ValidationError, match="must not hold credentials"):
        StorageConfig(gdal_options={"AWS_SECRET_ACCESS_KEY": "x"})
    with pytest.raises(ValidationError, match="gdal_cache_mb"):
        StorageConfig(gdal_options={"GDAL_CACHEMAX": "64"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        StorageConfig(endpoint="http://h:1")


@pytest.mark.parametrize(
    "options",
    [
        {"key": FAKE_SHAPED_KEY_ID, "secret": "uhr-not-a-real/secret+key"},  # s3fs's own arguments
        {"client_kwargs": {"aws_secret_access_key": "uhr-not-a-real/secret+key"}},  # botocore's, nested
        {"token": "uhr-not-a-real-session-token"},
        {"account_key": "x"},
        {"sas_token": "sv=2020&sig=x"},
        {"connection_string": "AccountKey=x"},
    ],
)
def test_fs_options_refuse_credentials(clean_env, options):
    with pytest.raises(ValidationError, match="fs_options must not hold credentials") as caught:
        StorageConfig(fs_options=options)
    assert "not-a-real/secret+key" not in str(caught.value) and "not-a-real-session-token" not in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [
        {"endpoint_url": "https://uhr-not-a-real-user:uhr-not-a-real-password@minio.internal:9000"},
        {"client_kwargs": {"endpoint_url": "https://uhr-not-a-real-user:uhr-not-a-real-password@minio.internal:9000"}},
    ],
    ids=["endpoint", "nested-endpoint"],
)
def test_fs_options_refuse_a_url_carrying_credentials(clean_env, options):
    with pytest.raises(ValidationError, match="fs_options must not hold credentials") as caught:
        StorageConfig(fs_options=options)
    assert "not-a-real" not in str(caught.value)


@pytest.mark.parametrize("header", ["X-Api-Key: uhr-not-a-real-key", "Cookie: sessionid=uhr-not-a-real-session"])
def test_gdal_http_headers_carrying_a_credential_are_refused(clean_env, header):
    # redact() leaves these two alone, so the header's own name must be what refuses them.
    with pytest.raises(ValidationError, match="must not hold credentials"):
        StorageConfig(gdal_options={"GDAL_HTTP_HEADERS": header})


def test_anonymous_access_reaches_each_store_unsigned(clean_env, monkeypatch):
    assert StorageConfig(anonymous=True).filesystem("s3://bucket/key.tif").anon is True
    assert StorageConfig().filesystem("s3://bucket/key.tif").anon is False
    made = []
    monkeypatch.setattr(fsspec, "filesystem", lambda protocol, **options: made.append((protocol, options)))
    StorageConfig(anonymous=True).filesystem("gs://bucket/key.tif")
    StorageConfig(anonymous=True).filesystem("az://container/key.tif")
    StorageConfig().filesystem("gs://bucket/key.tif")
    assert made == [("gs", {"token": "anon"}), ("az", {"anon": True}), ("gs", {})]


def test_fs_options_keep_what_is_no_secret(clean_env):
    for options in ({"requester_pays": True}, {"token": "anon"}, {"token": "/keys/service-account.json"}):
        assert StorageConfig(fs_options=options).fs_options == options


def test_worker_env_vars_pass_credentials_through_only_when_set(clean_env):
    storage = StorageConfig(endpoint_url="http://127.0.0.1:5000", region="us-east-1", gdal_cache_mb=64)
    env = storage.worker_env_vars()
    assert all(isinstance(value, str) for value in env.values())
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5000" and env["AWS_REGION"] == "us-east-1"
    assert env["GDAL_CACHEMAX"] == "64" and env["AWS_S3_ENDPOINT"] == "127.0.0.1:5000"
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    clean_env.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "uhr-not-a-real-worker-secret")
    env = storage.worker_env_vars()
    assert env["AWS_ACCESS_KEY_ID"] == FAKE_ACCESS_KEY_ID and env["AWS_SECRET_ACCESS_KEY"] == "uhr-not-a-real-worker-secret"
    # ... and never into the config itself.
    assert "uhr-not-a-real-worker-secret" not in storage.model_dump_json()


def test_filesystem_is_s3fs_on_the_same_endpoint_or_local(clean_env):
    storage = StorageConfig(
        endpoint_url="http://127.0.0.1:5000", region="us-east-1", fs_options={"default_block_size": 2**20}
    )
    filesystem = storage.filesystem("s3://bucket/key.tif")
    assert isinstance(filesystem, s3fs.S3FileSystem)
    assert filesystem.endpoint_url == "http://127.0.0.1:5000" and filesystem.client_kwargs["region_name"] == "us-east-1"
    assert filesystem.default_block_size == 2**20
    assert isinstance(storage.filesystem("/tmp/scene.tif"), LocalFileSystem)
    assert isinstance(storage.filesystem("file:///tmp/scene.tif"), LocalFileSystem)
    assert "memory" in storage.filesystem("memory://archive/a.tif").protocol


@pytest.mark.parametrize(
    ("uri", "gdal_path", "remote"),
    [
        ("s3://bucket/a/b.tif", "/vsis3/bucket/a/b.tif", True),
        ("s3a://bucket/b.tif", "/vsis3/bucket/b.tif", True),
        ("gs://bucket/b.tif", "/vsigs/bucket/b.tif", True),
        ("https://host/b.tif?x=1", "/vsicurl/https://host/b.tif?x=1", True),
        ("/vsis3/bucket/b.tif", "/vsis3/bucket/b.tif", True),
        ("/vsimem/b.tif", "/vsimem/b.tif", False),
        ("/data/b.tif", "/data/b.tif", False),
        ("relative/b.tif", "relative/b.tif", False),
        ("file:///data/b.tif", "/data/b.tif", False),
    ],
)
def test_uri_helpers(uri, gdal_path, remote):
    assert to_gdal_path(uri) == gdal_path
    assert is_remote(uri) is remote


def test_to_gdal_path_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="no GDAL reader for ftp://"):
        to_gdal_path("ftp://host/b.tif")


def test_join_uri():
    assert join_uri("s3://bucket/archive/", "scenes", "/a.tif") == "s3://bucket/archive/scenes/a.tif"
    assert join_uri("s3://bucket", "a.tif") == "s3://bucket/a.tif"
    assert join_uri("/data/archive", "scenes", "a.tif") == "/data/archive/scenes/a.tif"


PEM = "-----{} " + "PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("https://bucket.s3.amazonaws.com/a.tif?X-Amz-Signature=uhr-not-a-real-signature&X-Amz-Date=1", "uhr-not-a-real-signature"),
        ("https://x/a.tif?X-Amz-Security-Token=uhr-not-a-real//session-token", "uhr-not-a-real//session-token"),
        ("https://x/a.tif?sv=2020&sig=uhr-not-a-real-azure-signature%3D", "uhr-not-a-real-azure-signature%3D"),
        ("s3://uhr-not-a-real-user:uhr-not-a-real-password@host/bucket/a.tif", "uhr-not-a-real-password"),
        ("Authorization: AWS4-HMAC-SHA256 Credential=uhr-not-a-real-key-id/2025, Signature=uhr-not-a-real-sigv4-signature", "uhr-not-a-real-sigv4-signature"),
        ("aws_secret_access_key = uhr/NOT+A+REAL+SECRET", "uhr-not-a-real/secret+key"),
        (f"key id {FAKE_SHAPED_KEY_ID} failed", FAKE_SHAPED_KEY_ID),
        ("oauth client_secret=uhr-not-a-real-secret", "uhr-not-a-real-secret"),
        ("GS_SECRET_ACCESS_KEY=uhr-not-a-real-secret", "uhr-not-a-real-secret"),
        ("AccountName=x;AccountKey=uhr-not-a-real-account-key;EndpointSuffix=core", "uhr-not-a-real-account-key"),
        # A fake key; its markers are built from parts so that secret scanners see no key file here.
        ('{"private_key": "' + PEM.format("BEGIN") + '\\nuhrNOTREAL\\n' + PEM.format("END") + '\\n"}', "uhrNOTREAL"),
        ("Bearer uhr-not-a-real.jwt.token", "uhr-not-a-real.jwt.token"),
        ("refresh_token=1//uhr-not-a-real-refresh-token", "1//uhr-not-a-real-refresh-token"),
        ("{'SecretAccessKey': 'uhr-not-a-real/secret+key', 'SessionToken': 'uhr-not-a-real-session-token'}", "uhr-not-a-real/secret+key"),
        (f"s3://{FAKE_SHAPED_KEY_ID}:uhr/NOT+A+REAL+SECRET@bucket/x.tif", "uhr-not-a-real/secret+key"),
        ("https://storage.googleapis.com/b/a.tif?X-Goog-Algorithm=GOOG4&X-Goog-Signature=uhr-not-a-real-gcs-signature", "uhr-not-a-real-gcs-signature"),
        ("https://b.s3.amazonaws.com/a.tif?Expires=1&Signature=uhr-not-a-real-v2-signature%3D", "uhr-not-a-real-v2-signature%3D"),
    ],
    # Named, so test ids (in logs and pytest's cache) do not spell out the credential-shaped strings.
    ids=[
        "presigned-signature", "security-token", "azure-sas", "url-password", "sigv4-header", "aws-config-line",
        "key-id", "oauth-client-secret", "gcs-secret", "azure-account-key", "pem-key", "bearer", "refresh-token",
        "boto-dict", "url-key-pair", "gcs-signed-url", "s3-v2-presigned",
    ],
)
def test_redact_masks_credentials(text, secret):
    masked = redact(text)
    assert secret not in masked and "***" in masked
    # A message redacted twice (a SceneError's text, then an error row's) keeps what follows the mask.
    assert redact(masked + ": not found") == masked + ": not found"


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"])
def test_redact_masks_the_environment_secret_wherever_it_appears(monkeypatch, name):
    monkeypatch.setenv(name, "uhr-not-a-real-secret-from-env")
    assert redact("GDAL said: bad key uhr-not-a-real-secret-from-env here") == "GDAL said: bad key *** here"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_redact_leaves_text_without_credentials_alone(text):
    shapes = ("AKIA", "ASIA", "GOOG1", "ghp_", "hf_", "Bearer", "PRIVATE KEY")
    if "@" not in text and "=" not in text and ":" not in text and not any(shape in text for shape in shapes):
        assert redact(text) == text


def test_redact_leaves_counts_and_paths_alone():
    for text in ("tokens_kept=900 tokens_dense: 2000 max_new_tokens=64", "s3://bucket/dir/a@2x.tif", "/data/key/a.tif"):
        assert redact(text) == text


def test_scene_error_carries_redacted_uri_and_reason_and_pickles():
    error = SceneError(
        "https://uhr-not-a-real-user:uhr-not-a-real-password@h/a.tif?X-Amz-Signature=uhr-not-a-real-signature", "HTTP 403 for ?X-Amz-Signature=uhr-not-a-real-signature"
    )
    assert isinstance(error, UhrError)
    assert str(error) == "cannot read scene https://***@h/a.tif?X-Amz-Signature=***: HTTP 403 for ?X-Amz-Signature=***"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is SceneError and (copy.uri, copy.reason) == (error.uri, error.reason) and str(copy) == str(error)
    storage_error = pickle.loads(pickle.dumps(StorageError("s3://b", "access denied")))
    assert str(storage_error) == "storage error at s3://b: access denied"


def test_absolute_uri_anchors_local_paths_and_leaves_object_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("outputs/run") == str(tmp_path / "outputs" / "run")
    assert absolute_uri("/data/a.tif") == "/data/a.tif"
    # One file, one name: a scene list spelling it several ways asks it once.
    assert absolute_uri("file:///data/a.tif") == absolute_uri("/data//a.tif") == absolute_uri("/data/./a.tif") == "/data/a.tif"
    assert absolute_uri("s3://bucket/key") == "s3://bucket/key"
    assert absolute_uri("/vsis3/bucket/key") == "/vsis3/bucket/key"
