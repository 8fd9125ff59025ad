"""Where scenes, datasets and checkpoints live: URIs, object-store endpoints, GDAL tuning, secrets.

One `StorageConfig` serves every reader and writer of the package: GDAL (`gdal_env()`, for
`rasterio.Env`), fsspec (`filesystem(uri)`, for listing and non-raster objects) and Ray workers
(`worker_env_vars()`, for `runtime_env`). The endpoint of an S3-compatible store (MinIO, Ceph, a
local moto server) comes from the AWS SDKs' standard variables `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` unless set here, so GDAL and s3fs always talk to the same server.

Credentials are never fields of the config: GDAL and botocore find them in their usual places
(environment, shared credentials file, instance or pod identity), and `worker_env_vars()` passes
through only those present in the environment.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.core import split_protocol
from pydantic import BaseModel, ConfigDict, Field, field_validator

# Remote-COG tuning used by TiTiler and similar services (see shared/reference/ray-data-and-gdal.md).
DEFAULT_GDAL_OPTIONS: dict[str, str] = {
    # Opening `/vsis3/b/scene.tif` must not LIST the prefix looking for side-car files.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # ... nor probe `.ovr`, `.aux.xml`, `.msk` objects that do not exist.
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.jpg,.jpeg,.png,.jp2",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    # One GET at open brings the header and, for a COG, the IFDs of all its overviews.
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "VSI_CACHE": "TRUE",
    # Per open file: many open scenes times a large value exhausts memory.
    "VSI_CACHE_SIZE": str(16 * 1024 * 1024),
    # Object stores answer bursts with 503 SlowDown; GDAL backs off exponentially from this delay.
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    # Per-file download counters, read by `uhr.scenes.metering` to report the bytes a scene cost.
    "CPL_VSIL_NETWORK_STATS_ENABLED": "YES",
}

# Credential variables a worker may need; passed through from the environment, never stored.
CREDENTIAL_ENV_VARS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)

# Variables whose values are secrets: `redact` masks them wherever they appear verbatim.
_SECRET_ENV_VARS: tuple[str, ...] = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")

_S3_PROTOCOLS = ("s3", "s3a")
_GDAL_PREFIXES = {
    "s3": "/vsis3/",
    "s3a": "/vsis3/",
    "gs": "/vsigs/",
    "gcs": "/vsigs/",
    "az": "/vsiaz/",
    "abfs": "/vsiaz/",
}


# GDAL config options whose values are secrets or carry them (GS_SECRET_ACCESS_KEY,
# AZURE_STORAGE_ACCESS_KEY, AZURE_STORAGE_SAS_TOKEN, GDAL_HTTP_USERPWD, GS_OAUTH2_REFRESH_TOKEN, ...);
# options naming a file (`*_FILE`) hold a path, not the secret.
_CREDENTIAL_OPTION = re.compile(
    r"SECRET|PASSWORD|USERPWD|TOKEN|ACCESS_KEY|ACCOUNT_KEY|SWIFT_KEY|DELEGATION|CONNECTION_STRING|(^|_)SAS(_|$)|"
    r"PRIVATE_KEY|CREDENTIAL|BEARER",
    re.IGNORECASE,
)
_CREDENTIAL_HEADER = re.compile(r"authorization|cookie|token|secret|key", re.IGNORECASE)


def _holds_credential(name: str, value: str) -> bool:
    """True when a GDAL option looks like a credential: by its name, a header that may carry one
    (`GDAL_HTTP_HEADERS`), or a value `redact` would mask."""
    if _CREDENTIAL_OPTION.search(name) and not name.upper().endswith("_FILE"):
        return True
    if name.upper() == "GDAL_HTTP_HEADERS" and _CREDENTIAL_HEADER.search(str(value)):
        return True
    return redact(str(value)) != str(value)


# fsspec keyword arguments that carry secrets (s3fs `key`/`secret`/`token`, botocore's client
# arguments, adlfs `account_key`/`sas_token`/`connection_string`, ...), matched at any depth.
_FS_CREDENTIAL_KEYS = frozenset({"key", "secret", "password", "credential", "credentials"})
# gcsfs `token` modes (and a service-account file's path) are no secrets.
_GCSFS_TOKEN_MODES = frozenset({"anon", "google_default", "cache", "cloud", "browser"})


def _fs_credentials(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the `fs_options` entries that hold credentials."""
    found = []
    for name, value in options.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            found += _fs_credentials(value, f"{dotted}.")
        elif name == "token" and (value is None or value in _GCSFS_TOKEN_MODES or str(value).endswith(".json")):
            continue
        elif name.lower() in _FS_CREDENTIAL_KEYS or _holds_credential(name, str(value)):
            found.append(dotted)
    return found


def _endpoint_from_env() -> str | None:
    # The service-specific variable wins, as in the AWS SDKs.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region_from_env() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


class StorageConfig(BaseModel):
    """How to reach object storage, for GDAL, fsspec and Ray workers alike."""

    # Defaults from the environment are validated too; inputs stay out of error messages, since
    # a rejected endpoint may carry a secret.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_default=True, hide_input_in_errors=True
    )

    endpoint_url: str | None = Field(
        default_factory=_endpoint_from_env,
        description="S3 API endpoint as scheme://host[:port] (MinIO, Ceph, moto); None means AWS. "
        "Defaults to $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL.",
    )
    region: str | None = Field(
        default_factory=_region_from_env,
        description="Region of the buckets; defaults to $AWS_REGION, then $AWS_DEFAULT_REGION.",
    )
    anonymous: bool = Field(default=False, description="Send unsigned requests (public buckets).")
    gdal_options: dict[str, str] = Field(
        default_factory=dict,
        description="GDAL config options laid over DEFAULT_GDAL_OPTIONS and the endpoint settings, "
        "e.g. {'VSI_CACHE_SIZE': '4194304'}.",
    )
    gdal_cache_mb: int = Field(
        default=256,
        gt=0,
        description="GDAL raster block cache per process, MB (GDAL's default, 5% of RAM, multiplies "
        "with the workers of a node). It bounds the memory of a decimated read of a scene without "
        "overviews.",
    )
    fs_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the fsspec filesystem, e.g. {'requester_pays': True}.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint_url must look like http(s)://host[:port], got {redact(value)!r}")
        if parts.username or parts.password:
            raise ValueError("endpoint_url must not carry credentials; use the AWS credential variables")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"endpoint_url must have no path or query, got {redact(value)!r}")
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("fs_options")
    @classmethod
    def _check_fs_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        forbidden = _fs_credentials(value)
        if forbidden:
            raise ValueError(
                f"fs_options must not hold credentials ({', '.join(forbidden)}): options travel to run manifests and "
                "Ray runtime environments, and GDAL would not see them anyway. Set them in the environment of the "
                "driver and the nodes (or use instance / pod identity), where fsspec and GDAL both find them"
            )
        return value

    @field_validator("gdal_options")
    @classmethod
    def _check_gdal_options(cls, value: dict[str, str]) -> dict[str, str]:
        forbidden = sorted(name for name, option in value.items() if name in CREDENTIAL_ENV_VARS or _holds_credential(name, option))
        if forbidden:
            raise ValueError(
                f"gdal_options must not hold credentials ({', '.join(forbidden)}): options travel to run manifests "
                "and Ray runtime environments. Set them in the environment of the driver and the nodes (or use "
                "instance / pod identity), where GDAL finds them; request headers go in GDAL_HTTP_HEADER_FILE"
            )
        if "GDAL_CACHEMAX" in value:
            raise ValueError("set the GDAL block cache with gdal_cache_mb, not gdal_options")
        return value

    def gdal_env(self) -> dict[str, str | int]:
        """GDAL config options for `rasterio.Env(**storage.gdal_env())`.

        Defaults, then what the endpoint implies (`AWS_S3_ENDPOINT` host:port, `AWS_HTTPS`,
        path-style addressing for a custom endpoint), region and signing, then `gdal_options`.
        `GDAL_CACHEMAX` is in bytes, the one int (rasterio sets it with GDALSetCacheMax64).
        """
        env: dict[str, str | int] = dict(DEFAULT_GDAL_OPTIONS)
        env["GDAL_CACHEMAX"] = self.gdal_cache_mb * 1024 * 1024
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            env["AWS_S3_ENDPOINT"] = parts.netloc
            env["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
            # Custom S3 servers rarely resolve bucket.host names; path-style works on all of them.
            env["AWS_VIRTUAL_HOSTING"] = "FALSE"
        if self.region is not None:
            env["AWS_REGION"] = self.region
        if self.anonymous:  # public buckets of each store GDAL reads
            env.update({"AWS_NO_SIGN_REQUEST": "YES", "GS_NO_SIGN_REQUEST": "YES", "AZURE_NO_SIGN_REQUEST": "YES"})
        env.update(self.gdal_options)
        return env

    def filesystem(self, uri: str | os.PathLike[str]) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem for `uri`: s3fs on this endpoint for s3://, local for paths.

        Other protocols (gs://, az://, memory://) get fsspec's implementation with `fs_options`.
        The filesystem accepts the full URI as a path.
        """
        protocol = uri_protocol(uri)
        if protocol in (None, "file", "local"):
            return fsspec.filesystem("file")
        if protocol in _S3_PROTOCOLS:
            options: dict[str, Any] = {"anon": self.anonymous}
            if self.endpoint_url is not None:
                options["endpoint_url"] = self.endpoint_url
            if self.region is not None:
                options["client_kwargs"] = {"region_name": self.region}
            options.update(self.fs_options)
            return fsspec.filesystem("s3", **options)
        anonymous: dict[str, Any] = {}
        if self.anonymous and protocol in ("gs", "gcs"):
            anonymous = {"token": "anon"}  # gcsfs's unsigned access
        elif self.anonymous and protocol in ("az", "abfs", "abfss"):
            anonymous = {"anon": True}  # adlfs's
        return fsspec.filesystem(protocol, **{**anonymous, **self.fs_options})

    def worker_env_vars(self) -> dict[str, str]:
        """Environment variables a Ray worker needs to read like this process does.

        For `runtime_env={"env_vars": ...}`: the GDAL options (GDAL reads config options from the
        environment), the block-cache size, the endpoint and region for botocore/s3fs, and the
        credential variables set in this process's environment. The result holds secrets: never
        log it.
        """
        env = {name: str(value) for name, value in self.gdal_env().items()}
        # As an environment variable GDAL reads a small number as megabytes.
        env["GDAL_CACHEMAX"] = str(self.gdal_cache_mb)
        if self.endpoint_url is not None:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.region is not None:
            env["AWS_REGION"] = self.region
        for name in CREDENTIAL_ENV_VARS:
            value = os.environ.get(name)
            if value:
                env[name] = value
        return env


def uri_protocol(uri: str | os.PathLike[str]) -> str | None:
    """The protocol of `uri` ("s3", "gs", "https", "file"), or None for a plain path."""
    protocol, _ = split_protocol(os.fspath(uri))
    return protocol


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True when `uri` names an object reached over the network (s3://, https://, /vsis3/...)."""
    path = os.fspath(uri)
    if path.startswith("/vsi"):
        return not path.startswith("/vsimem/")
    return uri_protocol(path) not in (None, "file", "local")


def absolute_uri(uri: str) -> str:
    """`uri` with a local path made absolute (against this process's working directory) and
    normalised, `file://` spelling included, so one file has one name; object-store URIs unchanged.
    For URIs handed to workers, which run in other directories."""
    if is_remote(uri):
        return uri
    protocol, path = split_protocol(uri)
    if protocol in (None, "file", "local"):
        return os.path.abspath(path)
    return uri


def to_gdal_path(uri: str | os.PathLike[str]) -> str:
    """The GDAL path of `uri`: s3://b/k -> /vsis3/b/k, gs:// -> /vsigs/, https:// -> /vsicurl/.

    Local paths and `file://` URIs become plain paths; GDAL `/vsi...` paths pass unchanged.
    """
    path = os.fspath(uri)
    protocol, rest = split_protocol(path)
    if protocol is None:
        return path
    if protocol in ("file", "local"):
        return rest
    if protocol in _GDAL_PREFIXES:
        return _GDAL_PREFIXES[protocol] + rest
    if protocol in ("http", "https"):
        return "/vsicurl/" + path
    raise ValueError(f"no GDAL reader for {protocol}:// URIs: {redact(path)}")


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """`base` joined with `parts` by "/": join_uri("s3://b/archive", "scenes", "a.tif")."""
    base = os.fspath(base)
    if uri_protocol(base) is None:
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")] + [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


_REDACTED = "***"
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM private keys (a service-account JSON's "private_key" among them), before the pairs below.
    (
        re.compile(r"-{5}BEGIN [A-Z ]*PRIVATE KEY-{5}.*?-{5}END [A-Z ]*PRIVATE KEY-{5}", re.DOTALL),
        _REDACTED,
    ),
    # user:pass@ (or token@) in any URI; a password may hold "/", as AWS secret keys do.
    (re.compile(r"(?P<keep>[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s@:]+:[^\s@]*|[^/\s@]+)@"), rf"\g<keep>{_REDACTED}@"),
    # Signed-URL query parameters (S3 presigned, GCS signed, Azure SAS) and similar. Values already
    # masked are left alone here and below, so redacting a message twice keeps its text ("=***: why").
    (
        re.compile(
            r"(?P<keep>[?&](?:X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|AWSAccessKeyId|Signature|sig|"
            r"token|access_token|key|api_key|password|secret)=)(?!\*\*\*)[^&\s\"']+",
            re.IGNORECASE,
        ),
        rf"\g<keep>{_REDACTED}",
    ),
    # Authorization headers as they appear in HTTP traces, and bearer tokens wherever they appear.
    (re.compile(r"(?P<keep>Authorization\s*[:=]\s*)(?!\s*\*\*\*)[^\r\n]+", re.IGNORECASE), rf"\g<keep>{_REDACTED}"),
    (re.compile(r"(?P<keep>\bBearer\s+)[A-Za-z0-9._~+/-]+=*"), rf"\g<keep>{_REDACTED}"),
    # name=value / name: value pairs whose name ends in a secret word: client_secret, refresh_token,
    # GS_SECRET_ACCESS_KEY, api_key, 'SecretAccessKey': ..., AccountKey=... (but not tokens_kept=).
    (
        re.compile(
            r"(?P<keep>\b[\w-]*(?:secret|password|passwd|token|api_?key|access_?key|private_?key|account_?key|"
            r"access_?key_?id)[\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)[^\s\"',;&]+",
            re.IGNORECASE,
        ),
        rf"\g<keep>{_REDACTED}",
    ),
    # Access key ids and tokens recognisable by their shape: AWS, Google HMAC, GitHub, Hugging Face.
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|\bGOOG1[A-Z0-9]{20,}\b|\b(?:ghp|hf)_[A-Za-z0-9]{30,}\b"), _REDACTED),
)


class RedactingFilter(logging.Filter):
    """A logging filter masking credentials (`redact`) in the records of a library that logs URIs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_MASK = RedactingFilter()
# Libraries that log whole URLs, a signed one's signature included: GDAL's messages (an HTTP error,
# a retry) through rasterio's modules, fsspec's HTTP requests. A logger's filter sees only its own
# records, so each module's logger is named. Every process importing uhr (Ray workers too) masks them.
for _name in ("rasterio", "rasterio._env", "rasterio._base", "rasterio._io", "rasterio._filepath", "rasterio.env",
              "fsspec", "fsspec.http", "s3fs", "s3fs.core", "gcsfs", "gcsfs.core"):  # fmt: skip
    logging.getLogger(_name).addFilter(_MASK)


def redact(text: str) -> str:
    """`text` with credentials masked: URI user-info, signed-URL parameters, Authorization headers,
    `secret=...` pairs, AWS key ids, and the values of the secret AWS variables of this process."""
    for name in _SECRET_ENV_VARS:
        value = os.environ.get(name)
        # Short values ("test") would mask ordinary words; real secrets are long.
        if value and len(value) >= 8:
            text = text.replace(value, _REDACTED)
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text
