"""Config hashes name caches: every field counts, at any depth, and nothing else does."""

import dataclasses

from vista_jax.fingerprints import config_hash


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 8
    hidden: int = dataclasses.field(default=0, repr=False)  # Out of the repr, not the hash.


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    name: str = "a"


def test_every_field_counts_at_any_depth():
    base = config_hash({"model": Outer(), "rows": [Inner()]})
    assert config_hash({"model": Outer(Inner(hidden=1)), "rows": [Inner()]}) != base
    assert config_hash({"model": Outer(), "rows": [Inner(hidden=1)]}) != base
    assert config_hash({"model": Outer(name="b"), "rows": [Inner()]}) != base


def test_equal_configs_hash_equal_whatever_the_key_order():
    assert config_hash({"a": Inner(), "b": 1}) == config_hash({"b": 1, "a": Inner()})
    assert config_hash(Outer()) == config_hash(dataclasses.asdict(Outer()))
