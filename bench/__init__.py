"""Benchmarks (run as scripts: ``python bench/<name>.py``) and the pieces the tests share with them
(``bench.s3proxy``, the S3 fault proxy)."""
