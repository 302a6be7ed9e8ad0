#!/usr/bin/env bash
# Querying siglip's output with DuckDB (pip install duckdb, or the duckdb CLI). An output folder is a
# Parquet dataset: read it with a glob, keeping each path's newest row (below). A single file is read by
# its name, as it is.
set -euo pipefail
index=${1:?usage: query.sh INDEX_DIR  (made by nightly.sh)}

python3 - "$index" <<'PY'
import sys
import duckdb

index = sys.argv[1]
con = duckdb.connect()
# The current rows: while a run is updating a folder (or after one was killed), a file replaced by a newer
# part can have a row in an older part too; the newest part's row is the current one.
for name in ("embeddings", "tags"):
    con.sql(f"""
        create view {name} as select * exclude (rn, filename) from (
            select *, row_number() over (partition by path, path_bytes order by filename desc) as rn
            from read_parquet('{index}/{name}/*.parquet', filename = true)
        ) where rn = 1
    """)
emb, tags = "embeddings", "tags"

print("-- rows by status")
print(con.sql(f"select status, count(*) as n from {emb} group by status order by n desc"))

print("-- files that could not be read, and why")
print(con.sql(f"select path, error from {emb} where status = 'error' order by path limit 20"))

print("-- the 20 most frequent tags")
print(con.sql(f"""
    select t.tag, count(*) as photos, round(avg(t.score), 3) as mean_score
    from (select unnest(tags) as t from {tags} where status = 'ok')
    group by t.tag order by photos desc limit 20
"""))

print("-- photos most similar to the first photo (embeddings are L2-normalized: cosine = dot product)")
print(con.sql(f"""
    with q as (select embedding from {emb} where status = 'ok' order by path limit 1)
    select path, round(list_dot_product(e.embedding::float[], q.embedding::float[]), 4) as cosine
    from {emb} e, q where e.status = 'ok' order by cosine desc limit 5
"""))
PY
