"""The latest version of every example of a feedloop dataset, as a trainer reads it, with DuckDB
and with pandas (the two recipes the README documents), independently of feedloop's code.

usage: latest_view.py ROOT DATASET

Prints JSON {"duckdb": [rows], "pandas": [rows]}, each row {example_id, version, label,
accepted, chat_seconds, reported, blocked}, sorted by example_id. Exits 1 if the two disagree.
"""

import json
import os
import sys

import duckdb
import pandas as pd

COLUMNS = ["example_id", "version", "label", "accepted", "chat_seconds", "reported", "blocked"]


def plain(v):
    if v is None or (isinstance(v, float) and v != v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


def main():
    root, dataset = sys.argv[1], sys.argv[2]
    files = os.path.join(root, dataset, "**", "*.parquet")
    # The README's DuckDB view: the highest version of each example_id.
    duckdb.sql(
        f"""
        CREATE VIEW latest AS
        SELECT * FROM read_parquet('{files}', hive_partitioning = true)
        QUALIFY row_number() OVER (PARTITION BY example_id ORDER BY version DESC) = 1
        """
    )
    rows = duckdb.sql(f"SELECT {', '.join(COLUMNS)} FROM latest ORDER BY example_id").fetchall()
    from_duckdb = [dict(zip(COLUMNS, (plain(v) for v in r))) for r in rows]
    # The README's pandas recipe.
    df = pd.read_parquet(os.path.join(root, dataset))
    latest = df.sort_values("version").drop_duplicates("example_id", keep="last")
    latest = latest.sort_values("example_id")
    from_pandas = [
        {c: plain(r[c]) for c in COLUMNS} for r in latest[COLUMNS].to_dict("records")
    ]
    out = {"duckdb": from_duckdb, "pandas": from_pandas}
    if from_duckdb != from_pandas:
        json.dump(out, sys.stderr)
        print("\nDuckDB and pandas disagree", file=sys.stderr)
        sys.exit(1)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
