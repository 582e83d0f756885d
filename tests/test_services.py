"""The service fixtures in conftest.py give real, working servers."""

import boto3
import psycopg
import redis


def _conninfo(sqlalchemy_url: str) -> str:
    """psycopg takes the URL without SQLAlchemy's ``+psycopg`` driver suffix."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def test_fresh_postgres_url_is_a_real_empty_database(fresh_postgres_url: str) -> None:
    assert fresh_postgres_url.startswith("postgresql+psycopg://")
    with psycopg.connect(_conninfo(fresh_postgres_url)) as conn:
        version = conn.execute("select version()").fetchone()[0]
        tables = conn.execute(
            "select count(*) from information_schema.tables where table_schema = 'public'"
        ).fetchone()[0]
    assert version.startswith("PostgreSQL ")
    assert tables == 0


def test_fresh_postgres_url_is_another_database(postgres_url: str, fresh_postgres_url: str) -> None:
    assert fresh_postgres_url != postgres_url
    with psycopg.connect(_conninfo(fresh_postgres_url)) as conn:
        conn.execute("create table t (x int)")
        conn.execute("insert into t values (1)")
        assert conn.execute("select x from t").fetchone() == (1,)


def test_redis_url_is_a_real_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        client.set("lathe-test-key", b"hello")
        assert client.get("lathe-test-key") == b"hello"
    finally:
        client.delete("lathe-test-key")
        client.close()


def test_s3_bucket_stores_objects(s3_endpoint: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="adapters/a.bin", Body=b"\x00weights")
    body = s3.get_object(Bucket=s3_bucket, Key="adapters/a.bin")["Body"].read()
    assert body == b"\x00weights"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == [
        "adapters/a.bin"
    ]
