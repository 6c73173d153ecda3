"""Dataset loading for the command line: a Hub id, or a local directory or data file, as one `DatasetDict`.

`load_dataset_by_name("trl-lib/Capybara")` is `datasets.load_dataset("trl-lib/Capybara")`; a local path works offline:
a directory of data files (or one written by `save_to_disk`), or one `.json`, `.jsonl`, `.parquet`, `.csv`, `.txt` or
`.arrow` file (its rows become the `train` split). A name that looks like a path but does not exist is refused with
a [`DatasetNotFound`] error instead of a Hub look-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["DATA_FILE_BUILDERS", "DatasetNotFound", "load_dataset_by_name", "looks_like_local_path"]

DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
"""`datasets` builder used for a single local data file, by file suffix."""


class DatasetNotFound(ValueError):
    """A dataset name names a local path that does not exist, or a local file of an unsupported type."""


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path (a Hub id is `name` or `owner/name`)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or Path(name).suffix.lower() in DATA_FILE_BUILDERS
        or name.count("/") > 1
        or "\\" in name
        or name in (".", "..")
    )


def load_dataset_by_name(name: str, config: str | None = None, streaming: bool = False) -> Any:
    """Load `name` (a Hub dataset id, or a local directory or data file) as a `DatasetDict`.

    Args:
        name (`str`):
            A Hub id (`"trl-lib/Capybara"`), a local directory (data files, or the output of `save_to_disk`) or a
            local `.json`, `.jsonl`, `.parquet`, `.csv`, `.txt` or `.arrow` file (loaded as the `train` split).
        config (`str`, *optional*):
            Dataset configuration name (`name=` of `datasets.load_dataset`).
        streaming (`bool`, *optional*, defaults to `False`):
            Load an `IterableDatasetDict` instead.

    Returns:
        `datasets.DatasetDict` (or `IterableDatasetDict` when streaming).

    Raises:
        DatasetNotFound: If `name` looks like a local path but does not exist, or is a file of an unsupported type.
    """
    import datasets

    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if streaming:
                loaded = (
                    loaded.to_iterable_dataset()
                    if isinstance(loaded, datasets.Dataset)
                    else datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
                )
            if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
                loaded = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": loaded})
            return loaded
        return datasets.load_dataset(str(path), name=config, streaming=streaming)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetNotFound(
                f"dataset file {name!r} has an unsupported suffix {path.suffix!r}; use one of "
                f"{', '.join(DATA_FILE_BUILDERS)} or a directory."
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
    if looks_like_local_path(name):
        raise DatasetNotFound(f"dataset path {name!r} does not exist (no such file or directory).")
    try:
        return datasets.load_dataset(name, name=config, streaming=streaming)
    except (ConnectionError, FileNotFoundError) as error:
        raise DatasetNotFound(
            f"dataset {name!r} is neither a local file or directory nor loadable from the Hub: "
            f"{' '.join(str(error).split())}"
        ) from None
