"""A prepared dataset k times larger, for memory benchmarks where ingest itself cannot run:
impressions and row-level CTR history replicated k times with distinct impression ids
(`<id>-<copy>`); entity-level CTR history, texts and splits as in the source.

    python bench/replicate_prepared.py SRC_DIR DST_DIR K      # then: nlpctr features apply --data DST_DIR

Row counts, not values, drive the costs measured on it (joins, streaming, metrics).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from nlpctr.errors import UserError
from nlpctr.layout import CTR_HISTORY, CTR_HISTORY_ROWS, IMPRESSIONS, read_manifest, write_manifest
from nlpctr.models import sql
from nlpctr.pipelines.ownership import claim_output_dir


def replicate(src: Path, dst: Path, copies: int) -> None:
    # DST is replaced only when it is new, empty or a prepared dataset (a user's folder never).
    claim_output_dir(dst, "data prepare", inputs=[src], flag="DST_DIR")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as spill, sql.connect(spill, "1GB") as con:
        for folder in (IMPRESSIONS, CTR_HISTORY_ROWS):
            (dst / folder).mkdir()
            for i in range(copies):
                source = sql.literal(f"{src / folder}/*.parquet")
                target = sql.literal(dst / folder / f"part-{i:05d}.parquet")
                con.execute(
                    f"COPY (SELECT * REPLACE (impression_id || '-{i}' AS impression_id) "
                    f"FROM read_parquet({source})) TO {target} (FORMAT parquet)"
                )
    shutil.copytree(src / CTR_HISTORY, dst / CTR_HISTORY)
    manifest = read_manifest(src)
    manifest.update(rows_in=manifest["rows_in"] * copies, rows_written=manifest["rows_written"] * copies)
    manifest["description"] = f"{manifest['description']} (replicated {copies}x with distinct impression ids)"
    write_manifest(dst, manifest)


if __name__ == "__main__":
    try:
        replicate(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), int(sys.argv[3]))
    except UserError as error:
        print(f"replicate_prepared: error: {error}", file=sys.stderr)
        sys.exit(2)
