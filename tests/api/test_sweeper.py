"""What an upload interrupted by a crash leaves in S3 is swept; finished files are kept."""

from __future__ import annotations

import io

import boto3

from app.db import make_engine, make_sessionmaker
from app.services.files import sweep_orphans
from app.storage import file_key, open_store
from tests.api.datasets import CHAT


def test_orphans_and_unfinished_uploads_are_swept(team, api_env) -> None:
    kept = team.upload(CHAT).json()["id"]
    store = open_store(api_env["LATHE_STORAGE_URL"], api_env["LATHE_S3_ENDPOINT_URL"])
    orphan = file_key(team.id, "file-never-recorded")
    store.put(orphan, io.BytesIO(CHAT))  # the API died between the upload and the commit
    bucket, prefix = api_env["LATHE_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=api_env["LATHE_S3_ENDPOINT_URL"])
    s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{file_key(team.id, 'file-cut')}")
    engine = make_engine(api_env["LATHE_DATABASE_URL"])

    def keys() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

    with make_sessionmaker(engine)() as session:
        # Within the grace period an object may be an upload about to be recorded: kept.
        # (moto dates every multipart upload 2010, so that one counts as stale already.)
        sweep_orphans(session, store, grace_seconds=3600)
        assert f"{prefix}/{orphan}" in keys()
        removed = sweep_orphans(session, store, grace_seconds=-5)
    engine.dispose()
    assert removed >= 1
    assert f"{prefix}/{orphan}" not in keys()
    assert team.get(f"/v1/files/{kept}/content").content == CHAT
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
