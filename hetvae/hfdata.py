"""Hugging Face datasets as image sources: a dataset saved with ``save_to_disk``, or ``.parquet``
files, read map-style (``dataset[i][column]``) with random access, one encoded image at a time.

Only the encoded bytes come out of here (or, for an image stored by reference, its file path);
:class:`hetvae.data.ImageDataset` decodes them by the same rules as image files
(:func:`hetvae.images.decode_image`), so a photograph gives the same pixels from a folder or a dataset.

The ``datasets`` package is an optional dependency (``pip install "hetvae[data]"``), imported
only when such a source is opened.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from pathlib import Path

INSTALL_HINT = 'pip install "hetvae[data]"'
PARQUET_SUFFIX = ".parquet"
_GLOB_CHARACTERS = "*?["


def import_datasets():
    """The ``datasets`` module, or an ``ImportError`` that says how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"reading a Hugging Face dataset needs the 'datasets' package, which is not installed: {INSTALL_HINT}"
        ) from exc
    return datasets


def is_dataset_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` (``dataset_info.json`` and
    ``state.json``) or ``DatasetDict.save_to_disk`` (``dataset_dict.json``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return False
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    )


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether ``path`` names parquet files: a ``.parquet`` path, possibly a glob pattern."""
    return str(path).lower().endswith(PARQUET_SUFFIX)


def parquet_files(path: str | os.PathLike) -> list[str]:
    """The files a ``.parquet`` path names: the file itself, a glob pattern's matches, or the
    ``.parquet`` files in a folder so named (searched recursively), sorted.

    Raises:
        FileNotFoundError: the file does not exist, or the pattern matches nothing.
    """
    pattern = os.path.expanduser(str(path))
    if any(c in pattern for c in _GLOB_CHARACTERS):
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"no parquet file matches {pattern!r}")
        return files
    if os.path.isdir(pattern):  # a folder named like a file, as Spark writes them: the parquet files in it
        files = sorted(glob.glob(os.path.join(glob.escape(pattern), "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no parquet file in the folder {pattern!r}")
        return files
    if not os.path.isfile(pattern):
        raise FileNotFoundError(f"parquet file does not exist: {pattern!r}")
    return [pattern]


class DatasetImages:
    """The encoded images of one column of a Hugging Face dataset, by row.

    Args:
        path: a ``save_to_disk`` folder (of a ``Dataset``, or of a ``DatasetDict``: its
            ``"train"`` split is read, with a ``UserWarning`` that says so; without one, name a
            split's subfolder: ``ValueError``), or a ``.parquet`` file or glob pattern (converted once by
            ``datasets`` into its cache, ``HF_DATASETS_CACHE``, then memory-mapped like a saved dataset).
        column: the column holding the images: an ``Image`` feature, raw bytes (``binary``) of
            an encoded image file, or ``Image``'s storage without its feature (a struct of ``bytes``
            and ``path``, as parquet files written by other tools may hold).

    ``payload(i)`` is row ``i``'s encoded image (``bytes``), or the path of its file (``str``)
    for an ``Image`` stored by reference; ``name(i)`` is ``"<path>[<i>]"``. Only ``column`` is
    read: the dataset's other columns are never touched.

    Raises:
        ImportError: ``datasets`` is not installed (the message says how to install it).
        FileNotFoundError: nothing at ``path``.
        ValueError: not a dataset, a ``DatasetDict`` without a ``"train"`` split, no column
            ``column`` (the message names the columns there are), a column of another type, or no rows.
    """

    def __init__(self, path: str | os.PathLike, column: str = "image") -> None:
        datasets = import_datasets()
        self.path = str(path)
        self.column = column
        if is_parquet(path):
            files = parquet_files(path)
            columns, rows = _parquet_layout(files)
            _require_column(columns, column, self.path)
            if rows == 0:  # datasets cannot load it ("corresponds to no data")
                raise ValueError(f"the Hugging Face dataset {self.path!r} is empty (0 rows)")
            dataset = self._load(lambda: datasets.Dataset.from_parquet(files if len(files) > 1 else files[0],
                                                                      columns=[column]))
        else:
            folder = Path(path).expanduser()
            if not folder.exists():
                raise FileNotFoundError(f"Hugging Face dataset does not exist: {self.path!r}")
            if not is_dataset_folder(folder):
                raise ValueError(
                    f"{self.path!r} is not a Hugging Face dataset saved with save_to_disk "
                    "(no dataset_info.json and state.json, nor dataset_dict.json)"
                )
            if not (folder / "dataset_dict.json").is_file() and _saves_no_rows(folder):
                raise ValueError(f"the Hugging Face dataset {self.path!r} is empty (0 rows)")
            dataset = self._load(lambda: datasets.load_from_disk(str(folder)))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = self._split(dataset)
            _require_column(dataset.column_names, column, self.path)
            dataset = dataset.select_columns([column])
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image):
            if feature.decode:  # the encoded bytes, decoded by hetvae's rules, not datasets' PIL image
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif not (_is_binary(datasets, feature) or (isinstance(feature, dict) and _is_binary(datasets, feature.get("bytes")))):
            raise ValueError(
                f"column {column!r} of the Hugging Face dataset {self.path!r} holds {feature}, not images: "
                "expected an Image feature, raw bytes (binary) of encoded image files, or Image's storage "
                "(a struct of 'bytes' and 'path')"
            )
        if len(dataset) == 0:
            raise ValueError(f"the Hugging Face dataset {self.path!r} is empty (0 rows)")
        self._dataset = dataset.with_format(None)

    def _load(self, load):
        """``load()``, its failures (datasets raises many kinds) as a ValueError naming the dataset."""
        try:
            return load()
        except Exception as exc:
            raise ValueError(f"cannot load the Hugging Face dataset {self.path!r}: {type(exc).__name__}: {exc}") from exc

    def _split(self, splits) -> object:
        names = list(splits)
        if "train" not in splits:
            example = Path(self.path) / names[0] if names else Path(self.path) / "<split>"
            raise ValueError(
                f"{self.path!r} is a Hugging Face DatasetDict with the splits {', '.join(names) or '(none)'} "
                f"and no 'train': name one split's subfolder as the path, e.g. {str(example)!r}"
            )
        others = f" (name a split's subfolder, e.g. {str(Path(self.path) / 'train')!r}, to choose)" if len(names) > 1 else ""
        warnings.warn(
            f"{self.path!r} is a Hugging Face DatasetDict with the split{'s' * (len(names) > 1)} {', '.join(names)}: "
            f"reading 'train'{others}",
            UserWarning,
            stacklevel=4,
        )
        self.path = str(Path(self.path) / "train")
        return splits["train"]

    def __len__(self) -> int:
        return len(self._dataset)

    def name(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def payload(self, i: int) -> bytes | str:
        """Row ``i``'s encoded image, or the path of its file.

        Raises:
            ValueError: the cell is empty (``None``) or holds something else (the message names the row).
        """
        cell = self._dataset[int(i)][self.column]
        if isinstance(cell, dict):  # an Image feature read without decoding
            if cell.get("bytes") is not None:
                return cell["bytes"]
            if cell.get("path"):
                return str(cell["path"])
            cell = None
        if isinstance(cell, (bytes, bytearray, memoryview)):
            return bytes(cell)
        raise ValueError(f"{self.name(i)} holds no image ({'empty' if cell is None else type(cell).__name__})")


def _is_binary(datasets, feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")


def _parquet_layout(files: list[str]) -> tuple[list[str], int]:
    """The column names of the first parquet file and the rows of all of them, from their footers."""
    import pyarrow.parquet  # a dependency of datasets

    rows = 0
    for i, file in enumerate(files):
        try:
            meta = pyarrow.parquet.read_metadata(file)
            if i == 0:
                columns = list(meta.schema.to_arrow_schema().names)
            rows += meta.num_rows
        except Exception as exc:  # pyarrow's ArrowInvalid, OSError, ...
            raise ValueError(f"cannot read the parquet file {file!r}: {type(exc).__name__}: {exc}") from exc
    return columns, rows


def _saves_no_rows(folder: Path) -> bool:
    """Whether a saved ``Dataset``'s ``state.json`` lists no data file (an empty dataset, which
    ``load_from_disk`` cannot load)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False  # load_from_disk says what is wrong
    return isinstance(state, dict) and state.get("_data_files") == []


def _require_column(columns: list[str], column: str, path: str) -> None:
    if column not in columns:
        raise ValueError(
            f"the Hugging Face dataset {path!r} has no column {column!r} (data.image_column); "
            f"its columns: {', '.join(columns) or '(none)'}"
        )
