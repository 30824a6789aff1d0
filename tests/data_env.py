"""Where tests find the real datasets (docs/PROTOCOLS.md §6).

`VISTA_DATA_DIR` points at the directory holding `ml-1m/` and `ml-100k/`. When it is unset or
the dataset is missing, a test skips with the reason, unless `VISTA_REQUIRE_DATA=1` (CI that
promises the data), in which case it fails.
"""

import os
import pathlib

import pytest

DATA_DIR_ENV = "VISTA_DATA_DIR"
REQUIRE_DATA_ENV = "VISTA_REQUIRE_DATA"


def real_data_dir(name: str) -> pathlib.Path:
    """`$VISTA_DATA_DIR/<name>`, or skip (fail when data is required) if it is not there."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        reason = (
            f"{DATA_DIR_ENV} is not set; set it to the directory holding {name}/ "
            "(unzipped GroupLens/RecBole data, see data/README.md) to run real-data tests"
        )
    else:
        path = pathlib.Path(root) / name
        if path.is_dir():
            return path
        reason = f"{path} does not exist; {DATA_DIR_ENV}={root} holds no {name}/ directory"
    if os.environ.get(REQUIRE_DATA_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_DATA_ENV}=1 requires the data)")
    pytest.skip(reason)
