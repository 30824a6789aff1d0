"""Validated interaction event logs: the one door raw data comes in through.

Every loader (`vista_jax.data.loaders`) parses its file format into plain columns and hands them
to `from_columns`, which validates them (`vista_jax.data.eventlog_checks`), maps raw ids to dense
ids and sorts events per user by time. Ids follow docs/ARCHITECTURE.md: users are `0..U-1`, items
`1..I` and categories `1..C` with 0 as padding/unknown; action ids come from
`vista_jax.data.features`.

Every problem is an `EventLogError` (a `vista_jax.errors.DataError`) whose message names the
source, the row, line or column, and ends with "Fix: <what to do>".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from vista_jax.data import features
from vista_jax.data.eventlog_checks import (
    MILLISECONDS_THRESHOLD,
    TIME_UNITS,
    UNKNOWN_CATEGORY,
    EventLogError,
    Where,
    check_shapes,
    dense_categories,
    dense_ids,
    duplicate_rows,
    validated_label,
    validated_rating,
    validated_time,
)
from vista_jax.errors import ConfigError

PAD_ITEM = "<pad>"  # Placeholder raw id at dense item 0 when raw item ids are strings.
PAD_ITEM_NUMERIC = -1  # Same placeholder when raw item ids are integers.
DUPLICATE_POLICIES = ("drop", "keep", "error")


@dataclasses.dataclass(frozen=True)
class EventLogOptions:
    """How raw event data is read; each field is set by the flag `--config.data.<field>`."""

    # Unit of numeric timestamps: "s" or "ms" ("us" and "ns" work too); others are converted
    # to seconds. With "s", timestamps that look like milliseconds (median above 1e11, i.e.
    # after the year 5138 if they were seconds) are refused. Datetime columns carry their unit.
    time_unit: str = "s"
    # (lowest, highest) valid rating. Ratings outside are refused; the scale is mapped linearly
    # onto action ids 1..5 (on the default 1..5 scale an action is the rounded rating).
    rating_scale: tuple[float, float] = features.RATING_SCALE
    # Exact duplicate events (same user, item, timestamp and rating/label): "drop" keeps the
    # first and reports the count and first line on stderr; "keep" keeps all; "error" refuses.
    duplicates: str = "drop"
    # Id columns mixing numbers ("242") and names ("item_242") are refused, since the same id
    # written two ways would become two ids; True accepts them as distinct string ids.
    allow_mixed_ids: bool = False

    def __post_init__(self):
        try:
            scale = tuple(float(v) for v in self.rating_scale)
        except (TypeError, ValueError):
            scale = ()
        bad_scale = len(scale) != 2 or not np.isfinite(scale).all() or not scale[0] < scale[1]
        checks = [  # (key, is bad, what it must be, an example value)
            ("time_unit", self.time_unit not in TIME_UNITS, f"one of {tuple(TIME_UNITS)}", "ms"),
            (
                "duplicates",
                self.duplicates not in DUPLICATE_POLICIES,
                "drop, keep or error",
                "drop",
            ),
            ("rating_scale", bad_scale, "a (lowest, highest) pair", "'(1, 5)'"),
        ]
        for key, bad, expected, example in checks:
            if bad:
                raise ConfigError(
                    f"data.{key}={getattr(self, key)!r} is not {expected}. Fix: set it right, "
                    f"e.g. --config.data.{key}={example}."
                )
        object.__setattr__(self, "rating_scale", scale)


DEFAULT_OPTIONS = EventLogOptions()


@dataclasses.dataclass(frozen=True, eq=False)
class EventLog:
    """Events sorted by dense user, then time (stable: ties keep file order).

    All event columns have length `num_events`. `raw_user_ids[u]` is the raw id of dense user
    `u`; `raw_item_ids[i]` that of dense item `i` (index 0 is a padding placeholder);
    `category_names[c]` the name of dense category `c` (index 0 is "<unknown>").
    """

    user: np.ndarray  # int32 [N], dense 0..U-1
    item: np.ndarray  # int32 [N], dense 1..I
    time: np.ndarray  # int64 [N], seconds
    action: np.ndarray  # int32 [N], see vista_jax.data.features
    category: np.ndarray  # int32 [N], 0 = unknown
    label: np.ndarray | None  # float32 [N] in {0, 1}
    rating: np.ndarray | None  # float32 [N]
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    category_names: tuple[str, ...]

    def __post_init__(self):
        # Cheap structural checks only; value validation lives in `from_columns`.
        n = len(self.user)
        columns = dict(item=self.item, time=self.time, action=self.action, category=self.category)
        columns.update(label=self.label, rating=self.rating)
        for name, column in columns.items():
            if column is not None and len(column) != n:
                raise EventLogError(f"EventLog column {name!r} has {len(column)} rows, user {n}.")
        if not self.category_names or self.category_names[0] != UNKNOWN_CATEGORY:
            raise EventLogError(f"category_names[0] must be {UNKNOWN_CATEGORY!r}.")

    @property
    def num_users(self) -> int:
        return len(self.raw_user_ids)

    @property
    def num_items(self) -> int:
        """Number of real items; item tables need `num_items + 1` rows (0 is padding)."""
        return len(self.raw_item_ids) - 1

    @property
    def num_categories(self) -> int:
        """Number of known categories; tables need `num_categories + 1` rows (0 is unknown)."""
        return len(self.category_names) - 1

    @property
    def num_events(self) -> int:
        return len(self.user)

    @functools.cached_property
    def user_offsets(self) -> np.ndarray:
        """CSR offsets: user `u`'s events are `[offsets[u], offsets[u + 1])`; int64 [U + 1]."""
        counts = np.bincount(self.user, minlength=self.num_users)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def user_slice(self, u: int) -> slice:
        offsets = self.user_offsets
        return slice(int(offsets[u]), int(offsets[u + 1]))

    @functools.cached_property
    def item_category(self) -> np.ndarray:
        """Dense category of each dense item, int32 [num_items + 1] (0 for padding/unknown)."""
        table = np.zeros(self.num_items + 1, np.int32)
        table[self.item] = self.category  # Consistent per item, validated in `from_columns`.
        return table


Column = Sequence[Any] | np.ndarray


def from_columns(
    user: Column,
    item: Column,
    time: Column,
    rating: Column | None = None,
    label: Column | None = None,
    category: Column | None = None,
    source: str | Where = "<arrays>",
    options: EventLogOptions = DEFAULT_OPTIONS,
) -> EventLog:
    """Validates raw event columns and returns an `EventLog` (dense ids, stable time sort).

    Args:
      user, item: raw ids (integers or strings); numeric ids are ordered numerically, others
        lexicographically, before dense ids are assigned.
      time: integer-valued timestamps in `options.time_unit` (floats such as 8.8e8 are
        accepted if integral); stored as seconds, sorted at full resolution.
      rating: optional finite ratings within `options.rating_scale` (not booleans).
      label: optional binary labels in {0, 1}. Not together with rating.
      category: optional raw category per event ("" / None / NaN = unknown); all events of an
        item must agree.
      source: names the data in error messages (a `Where` also names file lines).
      options: see `EventLogOptions` (time unit, rating scale, duplicates, mixed ids).
    """
    where = source if isinstance(source, Where) else Where(str(source))
    user, item, time = np.asarray(user), np.asarray(item), np.asarray(time)
    check_shapes(where, user=user, item=item, time=time, rating=rating, label=label,
                 category=category)  # fmt: skip
    sort_time, seconds = validated_time(time, where, options.time_unit)
    rating = None if rating is None else validated_rating(rating, where, options.rating_scale)
    label = None if label is None else validated_label(label, where)
    raw_users, user_index = dense_ids(user, "user", where, options.allow_mixed_ids)
    raw_items, item_index = dense_ids(item, "item", where, options.allow_mixed_ids)
    category_names, dense_category = dense_categories(category, item_index, raw_items, where)
    feedback = [("rating", rating), ("label", label)]
    feedback = [(name, column) for name, column in feedback if column is not None]
    keys = [("user", user_index), ("timestamp", sort_time), ("item", item_index), *feedback]
    order = np.argsort(sort_time, kind="stable")
    order = order[np.argsort(user_index[order], kind="stable")]
    order = order[~duplicate_rows(order, keys, options.duplicates, where)[order]]
    action = features.actions(rating, label, len(user), options.rating_scale)
    return EventLog(
        user=user_index[order].astype(np.int32),
        item=(item_index[order] + 1).astype(np.int32),  # 0 is padding.
        time=seconds[order],
        action=action[order],
        category=dense_category[order],
        label=None if label is None else label[order],
        rating=None if rating is None else rating[order],
        raw_user_ids=raw_users,
        raw_item_ids=_with_pad(raw_items),
        category_names=category_names,
    )


def _with_pad(raw_items: np.ndarray) -> np.ndarray:
    pad = PAD_ITEM_NUMERIC if raw_items.dtype.kind in "iu" else PAD_ITEM
    return np.concatenate([np.array([pad]), raw_items])  # Widens strings to fit "<pad>".


__all__ = [
    "DEFAULT_OPTIONS",
    "DUPLICATE_POLICIES",
    "MILLISECONDS_THRESHOLD",
    "PAD_ITEM",
    "PAD_ITEM_NUMERIC",
    "TIME_UNITS",
    "UNKNOWN_CATEGORY",
    "EventLog",
    "EventLogError",
    "EventLogOptions",
    "Where",
    "from_columns",
]
