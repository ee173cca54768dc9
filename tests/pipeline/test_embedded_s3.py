"""`sftjob run --embedded-s3`'s SeaweedFS: loopback only, and its data survives a restart (so runs resume)."""

from __future__ import annotations

from urllib.parse import urlparse

from sftjob_operator.local.embedded_s3 import EmbeddedS3


def test_embedded_s3_persists_across_restarts(tmp_path):
    s3 = EmbeddedS3(str(tmp_path / "s3")).start()
    try:
        assert urlparse(s3.endpoint_url).hostname == "127.0.0.1"
        s3.ensure_bucket("sftjob")
        s3.ensure_bucket("sftjob")  # idempotent
        s3.client().put_object(Bucket="sftjob", Key="runs/a/checkpoints/step-2/COMPLETE", Body=b"{}")
        first_key = s3.access_key
    finally:
        s3.stop()
    again = EmbeddedS3(str(tmp_path / "s3")).start()
    try:
        assert again.access_key == first_key  # credentials are kept with the data
        body = (
            again.client()
            .get_object(Bucket="sftjob", Key="runs/a/checkpoints/step-2/COMPLETE")["Body"]
            .read()
        )
        assert body == b"{}"
    finally:
        again.stop()
    assert again.proc is None
