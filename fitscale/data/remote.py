"""Datasets in S3-compatible object storage: one upload command, and a check before any rank starts.

Endpoint and credentials are never part of a recipe or of anything a run writes: boto3 reads the
credentials from its usual places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
~/.aws, or the instance's role), and the endpoint of a non-AWS server (MinIO, Ceph, a local test
server) from S3_ENDPOINT_URL, which is what Streaming's own downloader reads too. A cluster
profile passes them to the job as environment variables (launch.env).

`upload_dataset` copies a finished dataset folder to `s3://bucket/prefix`: every shard named by
index.json, then samples.npy and index.json, and fitscale.json last, so a prefix holding
fitscale.json holds the whole dataset; an interrupted upload is resumed by running it again
(objects already there with their size are skipped). A prefix that already holds another dataset
is refused (nothing is overwritten).

`check_remote` reads the dataset's index.json at `data.remote` before a rank starts, and turns
what can go wrong into one line naming the field and the fix: an endpoint that does not answer,
a bucket that is not there, credentials the server refuses, a prefix without a dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from fitscale.data.format import (
    INDEX_FILE,
    META_FILE,
    SAMPLES_FILE,
    check_local_shards,
    read_index,
    read_meta,
    shard_files,
)
from fitscale.errors import UserError

ENDPOINT_ENV = "S3_ENDPOINT_URL"
DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "InvalidToken",
    "ExpiredToken",
}
MISSING_BUCKET = {"NoSuchBucket"}


def split_s3(uri: str, field: str) -> tuple[str, str]:
    """(bucket, key prefix without trailing slash) of an s3:// URI; ValueError naming `field` otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{field}={uri}: expected s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


def s3_client(timeout: float = 60.0, attempts: int = 5):
    """A boto3 S3 client for the endpoint in S3_ENDPOINT_URL (AWS when unset), credentials from
    boto3's usual chain; `attempts` tries per request with boto3's standard backoff."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:
        raise ImportError("s3:// datasets need boto3: pip install boto3") from error
    config = Config(
        connect_timeout=min(timeout, 10.0),
        read_timeout=timeout,
        retries={"mode": "standard", "max_attempts": attempts},
    )
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get(ENDPOINT_ENV), config=config)


def describe_s3_error(error: Exception, uri: str, field: str) -> str:
    """One line for an error of boto3 reaching `uri` (set as `field`), naming what to fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get(ENDPOINT_ENV) or "AWS S3"
    bucket, _ = split_s3(uri, field)
    if isinstance(error, EndpointConnectionError) or type(error).__name__ in (
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
    ):
        return (
            f"{field}={uri}: the endpoint {endpoint} cannot be reached ({type(error).__name__}); check "
            f"{ENDPOINT_ENV} and that the server is up"
        )
    if isinstance(error, NoCredentialsError):
        return (
            f"{field}={uri}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) in the environment or the cluster profile's env"
        )
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in MISSING_BUCKET:
            return f"{field}={uri}: bucket {bucket!r} does not exist at {endpoint}; create it or fix the URI"
        if code in DENIED:
            return (
                f"{field}={uri}: {endpoint} refused the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment or the cluster profile"
            )
        return f"{field}={uri}: {endpoint} answered {code or type(error).__name__}"
    return f"{field}={uri}: {type(error).__name__}: {error}"


def check_remote(uri: str, field: str = "data.remote", timeout: float = 20.0) -> None:
    """The dataset at `uri` can be read: ValueError in one line otherwise. Only s3:// is checked
    here (other schemes are left to Streaming's downloader)."""
    if not uri.startswith("s3://"):
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri, field)
    client = s3_client(timeout, attempts=2)
    key = f"{prefix}/{INDEX_FILE}" if prefix else INDEX_FILE
    try:
        client.head_bucket(Bucket=bucket)
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            if not _bucket_exists(client, bucket):
                error.response["Error"]["Code"] = "NoSuchBucket"
                raise UserError(describe_s3_error(error, uri, field)) from None
            raise UserError(
                f"{field}={uri}: no {INDEX_FILE} there, so no dataset; upload one with "
                f"`fitscale data upload DATASET {uri}`"
            ) from None
        raise UserError(describe_s3_error(error, uri, field)) from None
    except BotoCoreError as error:
        raise UserError(describe_s3_error(error, uri, field)) from None


def _bucket_exists(client, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        return str(error.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchBucket", "NotFound")
    return True


def _remote_size(client, bucket: str, key: str) -> int | None:
    from botocore.exceptions import ClientError

    try:
        return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def upload_dataset(folder: str | Path, uri: str, overwrite: bool = False, progress: bool = True) -> int:
    """Upload the finished dataset `folder` to `uri` (s3://bucket/prefix); returns the files sent.

    Raises the dataset's own errors for an unfinished or damaged folder, ValueError in one line
    for an unreachable endpoint, a missing bucket, refused credentials, or a prefix that holds
    another dataset (unless `overwrite`)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from tqdm import tqdm

    folder = Path(folder)
    meta = read_meta(folder)
    check_local_shards(folder)
    bucket, prefix = split_s3(uri, "upload target")
    client = s3_client()

    def key(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    try:
        if not _bucket_exists(client, bucket):
            from botocore.exceptions import ClientError as Error

            missing = Error({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket")
            raise UserError(describe_s3_error(missing, uri, "upload target"))
        there = _remote_size(client, bucket, key(META_FILE))
        if there is not None and not overwrite:
            remote_meta = json.loads(client.get_object(Bucket=bucket, Key=key(META_FILE))["Body"].read())
            if remote_meta != meta:
                raise UserError(
                    f"{uri} already holds another dataset ({META_FILE} differs); upload to another prefix "
                    "or pass --overwrite to replace it"
                )
        names = [basename for basename, _ in _stored_files(folder)] + [SAMPLES_FILE, INDEX_FILE]
        sent = 0
        with tqdm(total=len(names) + 1, desc=f"upload -> {uri}", unit="file", disable=not progress) as bar:
            for name in names:
                local = folder / name
                if _remote_size(client, bucket, key(name)) != local.stat().st_size or name == INDEX_FILE:
                    client.upload_file(str(local), bucket, key(name))
                    sent += 1
                bar.update(1)
            client.upload_file(str(folder / META_FILE), bucket, key(META_FILE))  # last: marks it complete
            bar.update(1)
        return sent + 1
    except (ClientError, BotoCoreError) as error:
        raise UserError(describe_s3_error(error, uri, "upload target")) from None


def _stored_files(folder: Path) -> list[tuple[str, int]]:

    return shard_files(read_index(folder))
