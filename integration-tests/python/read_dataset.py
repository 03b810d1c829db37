"""Reads a feedloop dataset with pyarrow, independently of feedloop's own code.

usage: read_dataset.py ROOT DATASET

For every partition (dt=…/hour=…) it takes the highest manifest version, checks that each
listed file exists with the listed size, SHA-256 and row count, reads the files, and prints
JSON: {"schema": {column: arrow type}, "partitions": [...], "rows": [...]}. Exits 1 with a
message on any mismatch.
"""

import glob
import hashlib
import json
import os
import re
import sys
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow.parquet as pq


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def main():
    root, dataset = sys.argv[1], sys.argv[2]
    base = os.path.join(root, dataset)
    latest = {}
    for path in glob.glob(os.path.join(base, "dt=*", "hour=*", "_manifest.v*.json")):
        partition = os.path.relpath(os.path.dirname(path), base)
        version = int(re.search(r"_manifest\.v(\d+)\.json$", path).group(1))
        if partition not in latest or version > latest[partition][0]:
            latest[partition] = (version, path)
    rows, schema, partitions = [], None, []
    for partition, (version, path) in sorted(latest.items()):
        with open(path) as f:
            manifest = json.load(f)
        if manifest["version"] != version or manifest["partition"] != partition:
            fail(f"{path}: says version {manifest['version']} of {manifest['partition']}")
        total = 0
        for file in manifest["files"]:
            uri = urlparse(file["uri"])
            if uri.scheme != "file" or not os.path.isabs(url2pathname(uri.path)):
                fail(f"{partition}: {file['uri']} is not an absolute file:// URI")
            local = url2pathname(uri.path)
            if not os.path.isfile(local):
                fail(f"{partition}: listed file {local} is missing")
            with open(local, "rb") as f:
                data = f.read()
            if len(data) != file["byte_size"]:
                fail(f"{local}: {len(data)} bytes, manifest says {file['byte_size']}")
            if hashlib.sha256(data).hexdigest() != file["sha256"]:
                fail(f"{local}: checksum differs from the manifest")
            table = pq.read_table(local)
            if table.num_rows != file["row_count"]:
                fail(f"{local}: {table.num_rows} rows, manifest says {file['row_count']}")
            total += table.num_rows
            if schema is None:
                schema = {field.name: str(field.type) for field in table.schema}
            for row in table.to_pylist():
                for k, v in list(row.items()):
                    if hasattr(v, "isoformat"):
                        row[k] = int(v.timestamp() * 1000)
                row["_partition"] = partition
                rows.append(row)
        if total != manifest["row_count"]:
            fail(f"{partition}: files hold {total} rows, manifest says {manifest['row_count']}")
        partitions.append({"partition": partition, "version": version, "rows": total, "files": len(manifest["files"]),
                           "sources": manifest["sources"], "label_counts": manifest["label_counts"]})
    json.dump({"schema": schema or {}, "partitions": partitions, "rows": rows}, sys.stdout)


if __name__ == "__main__":
    main()
