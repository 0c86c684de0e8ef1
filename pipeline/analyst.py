"""DuckDB where analysts are: a connection that reads the archive straight from S3 (or the local endpoint).

DuckDB's httpfs extension is not bundled and `INSTALL httpfs` needs the internet, so it is loaded from
the `duckdb-extension-httpfs` wheel. The S3 secret is built from the same standard AWS environment the
rest of the pipeline uses (AWS_ENDPOINT_URL, AWS_REGION, credentials); dbt/profiles.yml does the same
with env_var(), so a query that works here works in a dbt model.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import duckdb

from pipeline import stack


def httpfs_extension_path() -> Path:
    """The httpfs extension shipped by the duckdb-extension-httpfs wheel for this DuckDB version."""
    import duckdb_extension_httpfs

    base = Path(duckdb_extension_httpfs.__file__).resolve().parent / "extensions"
    path = base / f"v{duckdb.__version__}" / "httpfs.duckdb_extension"
    if not path.exists():
        raise FileNotFoundError(f"no httpfs extension for DuckDB {duckdb.__version__} under {base}")
    return path


def s3_secret_sql(name: str = "archive_s3") -> str:
    """CREATE SECRET for the archive's S3 endpoint; values come from the environment at call time."""
    params = {
        "TYPE": "s3",
        "KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", ""),
        "SECRET": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        "REGION": stack.region(),
    }
    if token := os.environ.get("AWS_SESSION_TOKEN"):
        params["SESSION_TOKEN"] = token
    if url := stack.endpoint_url():
        parsed = urlparse(url)
        params.update(ENDPOINT=parsed.netloc, URL_STYLE="path", USE_SSL="true" if parsed.scheme == "https" else "false")
    rendered = ", ".join(f"{k} {v}" if k in ("TYPE", "USE_SSL") else f"{k} {_quote(v)}" for k, v in params.items())
    return f"CREATE OR REPLACE SECRET {name} ({rendered})"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def install_httpfs() -> Path:
    """Install httpfs from the wheel into DuckDB's extension directory (offline, idempotent).

    dbt-duckdb's profile asks for `httpfs` by name; once installed this way, DuckDB finds it locally
    instead of downloading it.
    """
    path = httpfs_extension_path()
    with duckdb.connect() as con:
        con.execute(f"INSTALL '{path}'")
    return path


def connect(database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with httpfs loaded and an S3 secret for the archive bucket."""
    con = duckdb.connect(database)
    con.execute(f"LOAD '{httpfs_extension_path()}'")
    con.execute(s3_secret_sql())
    return con


def archive_glob(bucket: str | None = None) -> str:
    """The hive-partitioned glob over every archived hour, e.g. s3://events-archive/year=*/month=*/day=*/hour=*/*.parquet."""
    bucket = bucket or os.environ.get("PIPELINE_ARCHIVE_BUCKET") or stack.load_stack_config().archive.bucket
    return f"s3://{bucket}/year=*/month=*/day=*/hour=*/*.parquet"


def read_archive_sql(bucket: str | None = None) -> str:
    """The analysts' one-liner: every archived event, with year/month/day/hour from the path."""
    return f"read_parquet('{archive_glob(bucket)}', hive_partitioning = true)"


if __name__ == "__main__":
    import argparse
    import logging

    parser = argparse.ArgumentParser(description="DuckDB over the archive")
    parser.add_argument(
        "--install-httpfs", action="store_true", help="install the httpfs extension from its wheel (offline)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.install_httpfs:
        logging.info("httpfs installed from %s", install_httpfs())
