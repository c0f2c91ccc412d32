"""``fractalgen/storage.py`` is the one S3 layer (docs/storage.md): no other module of the package
names an S3 client library, builds pyarrow's ``S3FileSystem`` or reads the endpoint variables.

Names are read from the code's tokens (comments and docstrings may mention them). The check is
shown to find each kind of use in a small sample first.
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fractalgen"
LAYER = PACKAGE / "storage.py"
NAMES = {"boto3", "botocore", "s3transfer", "S3FileSystem"}
STRINGS = {"S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"}


def s3_uses(source: str) -> set[str]:
    """The S3 client names and endpoint variables that ``source``'s code (not its comments) uses."""
    found: set[str] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in NAMES:
            found.add(tok.string)
        elif tok.type == tokenize.STRING and tok.string.strip("\"'") in STRINGS:
            found.add(tok.string.strip("\"'"))
    return found


def test_the_check_finds_each_kind_of_use() -> None:
    sample = (
        "import boto3  # a client\n"
        "from pyarrow import fs\n"
        "x = fs.S3FileSystem(endpoint_override='h')\n"
        "url = os.environ.get('AWS_ENDPOINT_URL')\n"
        '"""docstring: boto3, S3_ENDPOINT_URL"""\n'
        "# botocore in a comment\n"
    )
    assert s3_uses(sample) == {"boto3", "S3FileSystem", "AWS_ENDPOINT_URL"}


def test_only_storage_py_talks_to_s3() -> None:
    assert s3_uses(LAYER.read_text()) >= {"boto3", "S3FileSystem", "S3_ENDPOINT_URL"}
    others = {
        str(path.relative_to(PACKAGE.parent)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != LAYER and (uses := s3_uses(path.read_text()))
    }
    assert not others, f"S3 clients or endpoint variables outside fractalgen/storage.py: {others}"
