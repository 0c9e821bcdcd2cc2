import pyarrow.parquet as pq
from typer.testing import CliRunner

from curation import sources
from service.cli import app
from tests import s3
from tests.helpers import write_pool


def test_index_command_lists_a_folder_into_a_manifest(tmp_path):
    good, bad = write_pool(str(tmp_path / "pool"), good=12)
    out = str(tmp_path / "pool.parquet")
    result = CliRunner().invoke(app, ["index", str(tmp_path / "pool"), out])
    assert result.exit_code == 0, result.output
    assert "17 files listed" in result.output
    table = pq.read_table(out)
    assert sorted(table.column("uri").to_pylist()) == sorted(good + list(bad))
    assert table.column("image_id").to_pylist() == sources.image_ids(table.column("uri").to_pylist()).tolist()


def test_index_command_on_s3_and_its_validation(tmp_path):
    write_pool(str(tmp_path / "pool"), good=3)
    bucket = s3.new_bucket()
    uploaded = s3.upload_folder(str(tmp_path / "pool"), bucket + "/pool")
    result = CliRunner().invoke(app, ["index", bucket + "/pool", bucket + "/manifests/pool.parquet"])
    assert result.exit_code == 0, result.output
    assert sources.row_groups(bucket + "/manifests/pool.parquet") == [(bucket + "/manifests/pool.parquet", 0, 8)]
    listed = sources.read_unlabeled(bucket + "/manifests/pool.parquet", 0, 0, 8)
    assert sorted(listed.column("uri").to_pylist()) == uploaded

    result = CliRunner().invoke(app, ["index", str(tmp_path / "pool"), str(tmp_path / "pool.csv")])
    assert result.exit_code != 0 and ".parquet" in result.output
