"""Image sources: ImageNet folders, ImageNet tar archives and Parquet files, local or on S3.

Terms:
- *item*: one image of a source, in a fixed order (folders: sorted paths; tars: archive order;
  Parquet: file order, then row order). ``len(source)`` counts items.
- *key*: an item's name, unique within the source (relative path, ``wnid/member`` or ``file#row``).
- *label name*: the class an item belongs to (an ImageNet wnid such as ``n01440764``, a folder name,
  or a Parquet label); the *label* is its index in ``class_names``, which defaults to the sorted
  label names (ImageNet: the sorted wnid order the released models use).
- *record*: what reading an item gives: key, label and the encoded bytes, or the reason it cannot
  be used (no label, unknown class, unreadable). Records with a reason are skipped and counted.

Layouts understood (``open_source`` picks by the URI):
- folder: ``ROOT/<class>/*.JPEG`` or ``ROOT/{train,val}/...`` (choose with ``split``, default
  ``train``); a flat folder of images (ImageNet ``val``) takes labels from a labels file: Kaggle's
  ``LOC_val_solution.csv`` or lines ``<file> <wnid>``; found beside or one level above the images,
  or passed as ``labels``. Files named ``<wnid>_*.JPEG`` label themselves.
- tar (uncompressed): ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class inside), a tar of
  the folder layout, or a flat tar of val images with a labels file. Members are indexed once by
  streaming through the archive; workers then read their members by byte offset.
- Parquet: a ``.parquet`` file or a folder/prefix of them (``split`` selects ``<split>-*.parquet``
  or a ``<split>/`` sub-folder); an image column (binary, or a struct with a ``bytes`` field as hubs
  publish) and a label column (integer indices, or strings). Class names come from ``class_names``,
  the hub's ``huggingface`` schema metadata (ClassLabel names), or the sorted distinct strings.

A source is split into *parts* with ``source.part(start, stop)``; a part is small and picklable, so
it can be sent to a worker process, and reading it opens its own connections.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fractalgen import storage
from fractalgen.pipelines import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "validation", "test")
LABEL_FILE_NAMES: tuple[str, ...] = (
    "LOC_val_solution.csv",
    "val_labels.txt",
    "val_labels.csv",
    "labels.txt",
    "labels.csv",
)
IMAGE_COLUMNS: tuple[str, ...] = ("image", "img", "jpg", "jpeg", "png", "image_bytes", "bytes")
WNID = re.compile(r"^(n\d{8})_")


@dataclass(frozen=True)
class Record:
    """One item read from a source: ``data`` is the encoded image, or ``error`` says why not."""

    key: str
    label: int
    data: bytes | None = None
    error: str | None = None


class Part(Protocol):
    """A contiguous range of a source's items, picklable, read in a worker."""

    def __len__(self) -> int: ...

    def read(self) -> Iterator[Record]: ...


class Source(Protocol):
    uri: str
    kind: str
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def part(self, start: int, stop: int) -> Part: ...

    def fingerprint(self) -> str: ...


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def read_labels_file(uri: str, *, endpoint: str | None = None) -> dict[str, str]:
    """Map image stem -> label name from a labels file.

    Formats: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first token is
    the wnid), or one ``<file> <label>`` / ``<file>,<label>`` pair per line.
    """
    text = storage.read_bytes(uri, endpoint=endpoint).decode("utf-8-sig")
    out: dict[str, str] = {}
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.DictReader(io.StringIO(text)):
            tokens = (row.get("PredictionString") or "").split()
            if tokens:
                out[_stem(row["ImageId"])] = tokens[0]
        return out
    for line in lines:
        tokens = line.replace(",", " ").split()
        if len(tokens) >= 2 and not line.lstrip().startswith("#"):
            out[_stem(tokens[0])] = tokens[1]
    if not out:
        raise DataError(f"labels file {uri} has no '<file> <label>' lines")
    return out


def _label_name(rel: str, labels: dict[str, str] | None) -> str | None:
    """Label name of an image at relative path ``rel`` (see the module docstring for the rules)."""
    if labels is not None:
        found = labels.get(_stem(rel))
        if found is not None:
            return found
    parts = rel.strip("/").split("/")
    if len(parts) >= 2 and parts[-2] not in SPLIT_NAMES and parts[-2] not in ("", "."):
        return parts[-2]
    match = WNID.match(parts[-1])
    return match.group(1) if match else None


def _class_index(
    names: Sequence[str | None], class_names: Sequence[str] | None
) -> tuple[tuple[str, ...], list[int], list[str | None]]:
    """Fix the class list and give every item its label (-1 plus a reason when it has none)."""
    if class_names is None:
        classes = tuple(sorted({n for n in names if n is not None}))
    else:
        classes = tuple(class_names)
    index = {c: i for i, c in enumerate(classes)}
    labels, reasons = [], []
    for name in names:
        if name is None:
            labels.append(-1)
            reasons.append("no label (not in a class folder, not in the labels file)")
        elif name not in index:
            labels.append(-1)
            reasons.append(f"class {name!r} not in class_names")
        else:
            labels.append(index[name])
            reasons.append(None)
    return classes, labels, reasons


def _digest(*chunks: object) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(json.dumps(chunk, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _find_labels_file(root: str, endpoint: str | None) -> str | None:
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else None
    for folder in (root, parent):
        if not folder:
            continue
        for name in LABEL_FILE_NAMES:
            candidate = storage.join(folder, name)
            if storage.exists(candidate, endpoint=endpoint):
                return candidate
    return None


# --------------------------------------------------------------------------------------------- folder


@dataclass
class FolderPart:
    root: str
    items: list[tuple[str, int, str | None]]  # (relative path, label, reason to skip)
    endpoint: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def read(self) -> Iterator[Record]:
        for rel, label, reason in self.items:
            if reason is not None:
                yield Record(rel, label, error=reason)
                continue
            try:
                data = storage.read_bytes(storage.join(self.root, rel), endpoint=self.endpoint)
            except Exception as err:  # unreadable file: skipped and counted, never fatal
                yield Record(rel, label, error=f"unreadable: {type(err).__name__}: {err}")
                continue
            yield Record(rel, label, data=data)


class FolderSource:
    """``ROOT/<class>/<image>`` (or flat images plus a labels file), local or on S3."""

    kind = "folder"

    def __init__(
        self,
        uri: str,
        *,
        split: str | None = None,
        labels: str | None = None,
        class_names: Sequence[str] | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        root = uri.rstrip("/")
        subdirs = storage.list_dirs(root, endpoint=endpoint)
        if split is not None:
            if split not in subdirs:
                raise DataError(f"source {uri} has no {split!r} folder (found {subdirs[:10]})")
            root = storage.join(root, split)
        elif "train" in subdirs and not any(
            is_image_name(f) for f in storage.list_files(root, endpoint=endpoint, recursive=False)
        ):
            root = storage.join(root, "train")
            split = "train"
            log.info("source %s has a train/ folder: converting split 'train' (pass split= for another)", uri)
        self.uri = uri
        self.root = root
        self.split = split
        files = [f for f in storage.list_files(root, endpoint=endpoint) if is_image_name(f)]
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) below {root}")
        if labels is None and any("/" not in f for f in files):
            labels = _find_labels_file(root, endpoint)
        self.labels_uri = labels
        label_map = read_labels_file(labels, endpoint=endpoint) if labels else None
        names = [_label_name(f, label_map) for f in files]
        self.class_names, label_ids, reasons = _class_index(names, class_names)
        self.items = list(zip(files, label_ids, reasons))

    def __len__(self) -> int:
        return len(self.items)

    def part(self, start: int, stop: int) -> FolderPart:
        return FolderPart(self.root, self.items[start:stop], self.endpoint)

    def fingerprint(self) -> str:
        return _digest(self.root, self.class_names, self.items)


# ------------------------------------------------------------------------------------------------ tar


_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


@dataclass
class TarPart:
    uri: str
    items: list[tuple[str, int, int, int, str | None]]  # (key, offset, size, label, reason)
    endpoint: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def read(self) -> Iterator[Record]:
        # Items are in archive order, so reads move forward through the file; on S3 the buffered
        # reader turns them into a few large ranged GETs.
        try:
            f = storage.open_input(self.uri, endpoint=self.endpoint, buffer_size=8 << 20)
        except Exception as err:
            for key, _, _, label, _ in self.items:
                yield Record(key, label, error=f"unreadable archive: {type(err).__name__}: {err}")
            return
        with f:
            for key, offset, size, label, reason in self.items:
                if reason is not None:
                    yield Record(key, label, error=reason)
                    continue
                try:
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise OSError(f"archive ends early ({len(data)} of {size} bytes)")
                except Exception as err:
                    yield Record(key, label, error=f"unreadable: {type(err).__name__}: {err}")
                    continue
                yield Record(key, label, data=data)


class TarSource:
    """An uncompressed tar archive of images (nested per-class tars allowed), local or on S3."""

    kind = "tar"

    def __init__(
        self,
        uri: str,
        *,
        split: str | None = None,
        labels: str | None = None,
        class_names: Sequence[str] | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.uri = uri
        self.endpoint = endpoint
        self.split = split
        head = storage.read_range(uri, 0, 6, endpoint=endpoint)
        for magic, name in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise DataError(
                    f"{uri} is {name}-compressed: compressed tars cannot be read by offset in parallel; "
                    "decompress it first (the ImageNet tars are uncompressed)"
                )
        entries = self._index()
        if not entries:
            raise DataError(f"no images in tar {uri}" + (f" under {split}/" if split else ""))
        if labels is None and any("/" not in key for key, *_ in entries):
            parent = uri.rsplit("/", 1)[0] if "/" in uri else "."
            labels = _find_labels_file(parent, endpoint) if parent != uri else None
        self.labels_uri = labels
        label_map = read_labels_file(labels, endpoint=endpoint) if labels else None
        names = [name if name is not None else _label_name(key, label_map) for key, _, _, name in entries]
        self.class_names, label_ids, reasons = _class_index(names, class_names)
        self.items = [
            (key, offset, size, label, reason)
            for (key, offset, size, _), label, reason in zip(entries, label_ids, reasons)
        ]

    def _keep(self, name: str) -> str | None:
        """The member name relative to the split folder, or None if it is outside the split."""
        name = name[2:] if name.startswith("./") else name
        if self.split is None:
            return name
        prefix = f"{self.split}/"
        return name[len(prefix) :] if name.startswith(prefix) else None

    def _index(self) -> list[tuple[str, int, int, str | None]]:
        """(key, byte offset, size, label name from a nested tar) for every image member."""
        entries: list[tuple[str, int, int, str | None]] = []
        with (
            storage.open_stream(self.uri, endpoint=self.endpoint) as f,
            tarfile.open(fileobj=f, mode="r|") as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                name = self._keep(member.name)
                if name is None:
                    continue
                if name.lower().endswith(".tar"):
                    # ILSVRC2012_img_train.tar: one uncompressed <wnid>.tar per class; an inner
                    # member's offset in the outer file is the sum of both data offsets.
                    wnid = _stem(name)
                    inner_file = tar.extractfile(member)
                    with tarfile.open(fileobj=inner_file, mode="r|") as inner:
                        for sub in inner:
                            if sub.isfile() and is_image_name(sub.name):
                                key = f"{wnid}/{sub.name.rsplit('/', 1)[-1]}"
                                entries.append((key, member.offset_data + sub.offset_data, sub.size, wnid))
                elif is_image_name(name):
                    entries.append((name, member.offset_data, member.size, None))
        return entries

    def __len__(self) -> int:
        return len(self.items)

    def part(self, start: int, stop: int) -> TarPart:
        return TarPart(self.uri, self.items[start:stop], self.endpoint)

    def fingerprint(self) -> str:
        return _digest(self.uri, self.class_names, self.items)


# -------------------------------------------------------------------------------------------- parquet


def _open_parquet(uri: str, endpoint: str | None):
    import pyarrow.parquet as pq  # deferred: heavy import

    # pyarrow reads through a seekable Python file (ranged boto3 GETs on S3): fork-safe for worker
    # processes, unlike an S3 filesystem initialised in the parent.
    return pq.ParquetFile(storage.open_input(uri, endpoint=endpoint, buffer_size=4 << 20))


def _hub_class_names(schema, label_column: str) -> list[str] | None:
    """ClassLabel names from the ``huggingface`` schema metadata hubs write into Parquet files."""
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        feature = features[label_column]
        names = feature.get("names")
        return list(names) if names else None
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class ParquetPart:
    files: list[tuple[str, list[int]]]  # (uri, rows per row group) for every file of the source
    start: int
    stop: int
    image_column: str
    label_column: str
    label_kind: str  # "index" or "name"
    class_names: tuple[str, ...]
    keys: list[str]  # file key (relative name) per file
    endpoint: str | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self) -> Iterator[Record]:
        index = {c: i for i, c in enumerate(self.class_names)}
        base = 0
        for (uri, groups), file_key in zip(self.files, self.keys):
            total = sum(groups)
            if base + total <= self.start or base >= self.stop:
                base += total
                continue
            try:
                pf = _open_parquet(uri, self.endpoint)
            except Exception as err:
                lo, hi = max(self.start, base), min(self.stop, base + total)
                for row in range(lo - base, hi - base):
                    yield Record(
                        f"{file_key}#{row}", -1, error=f"unreadable file: {type(err).__name__}: {err}"
                    )
                base += total
                continue
            group_base = base
            for g, rows in enumerate(groups):
                lo, hi = max(self.start, group_base), min(self.stop, group_base + rows)
                if lo < hi:
                    yield from self._read_group(pf, g, group_base, base, lo, hi, file_key, index)
                group_base += rows
            base += total

    def _read_group(
        self, pf, g: int, group_base: int, file_base: int, lo: int, hi: int, file_key: str, index
    ):
        try:
            table = pf.read_row_group(g, columns=[self.image_column, self.label_column])
            images = table.column(self.image_column).to_pylist()[lo - group_base : hi - group_base]
            labels = table.column(self.label_column).to_pylist()[lo - group_base : hi - group_base]
        except Exception as err:
            for row in range(lo - file_base, hi - file_base):
                yield Record(
                    f"{file_key}#{row}", -1, error=f"unreadable row group: {type(err).__name__}: {err}"
                )
            return
        for offset, (image, raw_label) in enumerate(zip(images, labels)):
            key = f"{file_key}#{lo - file_base + offset}"
            if isinstance(image, dict):
                image = image.get("bytes")
            if raw_label is None:
                yield Record(key, -1, error="no label (null)")
                continue
            if self.label_kind == "name":
                label = index.get(str(raw_label), -1)
                if label < 0:
                    yield Record(key, -1, error=f"class {raw_label!r} not in class_names")
                    continue
            else:
                label = int(raw_label)
                if not 0 <= label < len(self.class_names):
                    yield Record(key, -1, error=f"label {label} outside 0..{len(self.class_names) - 1}")
                    continue
            if not image:
                yield Record(key, label, error="no image bytes (null)")
                continue
            yield Record(key, label, data=bytes(image))


class ParquetSource:
    """Parquet files with an image-bytes column and a label column, local or on S3."""

    kind = "parquet"

    def __init__(
        self,
        uri: str,
        *,
        split: str | None = None,
        class_names: Sequence[str] | None = None,
        image_column: str | None = None,
        label_column: str = "label",
        endpoint: str | None = None,
    ) -> None:
        import pyarrow as pa  # deferred: heavy import

        self.uri = uri
        self.endpoint = endpoint
        if uri.endswith(".parquet"):
            files = [uri]
            keys = [storage.basename(uri)]
        else:
            rel = [f for f in storage.list_files(uri, endpoint=endpoint) if f.endswith(".parquet")]
            if split is not None:
                rel = [
                    f
                    for f in rel
                    if f.startswith(f"{split}/")
                    or storage.basename(f).startswith(f"{split}-")
                    or f"/{split}-" in f
                    or f"/{split}/" in f
                ]
            if not rel:
                raise DataError(f"no .parquet files below {uri}" + (f" for split {split!r}" if split else ""))
            files = [storage.join(uri, f) for f in rel]
            keys = rel
        self.keys = keys
        self.files: list[tuple[str, list[int]]] = []
        schema = None
        for f in files:
            pf = _open_parquet(f, endpoint)
            if schema is None:
                schema = pf.schema_arrow
            elif not pf.schema_arrow.equals(schema, check_metadata=False):
                raise DataError(f"{f} has a different schema from {files[0]}")
            meta = pf.metadata
            self.files.append((f, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]))
        assert schema is not None
        if image_column is None:
            image_column = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
            if image_column is None:
                raise DataError(f"{uri}: no image column among {schema.names}; pass image_column")
        if image_column not in schema.names or label_column not in schema.names:
            raise DataError(f"{uri}: columns {image_column!r}/{label_column!r} not in {schema.names}")
        image_type = schema.field(image_column).type
        if pa.types.is_struct(image_type):
            if image_type.get_field_index("bytes") < 0:
                raise DataError(f"{uri}: struct column {image_column!r} has no 'bytes' field")
        elif not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
            raise DataError(f"{uri}: column {image_column!r} is {image_type}, not binary image bytes")
        self.image_column = image_column
        self.label_column = label_column
        label_type = schema.field(label_column).type
        if pa.types.is_integer(label_type):
            self.label_kind = "index"
            names = list(class_names) if class_names is not None else _hub_class_names(schema, label_column)
            if names is None:
                top = max((v for v in self._label_values() if v is not None), default=-1)
                names = [str(i) for i in range(int(top) + 1)]
        elif pa.types.is_string(label_type) or pa.types.is_large_string(label_type):
            self.label_kind = "name"
            names = (
                list(class_names)
                if class_names is not None
                else sorted({str(v) for v in self._label_values() if v is not None})
            )
        else:
            raise DataError(f"{uri}: label column {label_column!r} is {label_type}; need integers or strings")
        self.class_names = tuple(names)
        self.num_rows = sum(sum(groups) for _, groups in self.files)
        if not self.num_rows:
            raise DataError(f"{uri}: the Parquet files hold no rows")

    def _label_values(self) -> list:
        values: list = []
        for f, _ in self.files:
            values += _open_parquet(f, self.endpoint).read(columns=[self.label_column]).column(0).to_pylist()
        return values

    def __len__(self) -> int:
        return self.num_rows

    def part(self, start: int, stop: int) -> ParquetPart:
        return ParquetPart(
            self.files,
            start,
            stop,
            self.image_column,
            self.label_column,
            self.label_kind,
            self.class_names,
            self.keys,
            self.endpoint,
        )

    def fingerprint(self) -> str:
        return _digest(self.files, self.keys, self.image_column, self.label_column, self.class_names)


# ------------------------------------------------------------------------------------------------ api


def open_source(
    uri: str,
    *,
    split: str | None = None,
    labels: str | None = None,
    class_names: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    endpoint: str | None = None,
) -> FolderSource | TarSource | ParquetSource:
    """Open a source by its URI: ``*.tar`` -> tar, ``*.parquet`` or a folder of them -> Parquet,
    any other folder -> ImageNet folder layout. Raises ``DataError`` naming the URI on problems."""
    storage.check_scheme(uri)
    lower = uri.lower().rstrip("/")
    if lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise DataError(f"{uri}: compressed tars cannot be read by offset in parallel; decompress it first")
    if lower.endswith(".tar"):
        if not storage.exists(uri, endpoint=endpoint):
            raise DataError(f"source {uri} does not exist")
        return TarSource(uri, split=split, labels=labels, class_names=class_names, endpoint=endpoint)
    if lower.endswith(".parquet"):
        if not storage.exists(uri, endpoint=endpoint):
            raise DataError(f"source {uri} does not exist")
        return ParquetSource(
            uri,
            split=split,
            class_names=class_names,
            image_column=image_column,
            label_column=label_column,
            endpoint=endpoint,
        )
    if not storage.is_dir(uri, endpoint=endpoint):
        raise DataError(f"source {uri} does not exist (expected a folder, a .tar or .parquet file)")
    files = storage.list_files(uri, endpoint=endpoint)
    if files and any(f.endswith(".parquet") for f in files) and not any(is_image_name(f) for f in files):
        return ParquetSource(
            uri,
            split=split,
            class_names=class_names,
            image_column=image_column,
            label_column=label_column,
            endpoint=endpoint,
        )
    return FolderSource(uri, split=split, labels=labels, class_names=class_names, endpoint=endpoint)
