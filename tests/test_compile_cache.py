"""torch.compile's caches key accel's custom ops by name only; accel tags the cache key with its code's hash
(accel/nn/_compile_cache.py), so a changed accel never reuses code compiled for its older ops."""
import shutil

import torch

from accel.nn import _compile_cache as compile_cache


def test_importing_the_ops_tags_the_cache_key_once_keeping_the_users_tag():
    import accel.nn.recurrence._op  # noqa: F401 (defines ops: tags on import)

    marker = f"accel-{compile_cache.source_hash()}"
    before = torch.compiler.config.cache_key_tag
    assert marker in before.split("+")
    try:  # not monkeypatch: its undo deletes the entry from torch's config module
        torch.compiler.config.cache_key_tag = "users-own"
        assert compile_cache.tag_compile_caches() == f"users-own+{marker}"
        assert compile_cache.tag_compile_caches() == f"users-own+{marker}"  # idempotent
    finally:
        torch.compiler.config.cache_key_tag = before


def test_source_hash_follows_every_python_file(tmp_path):
    copy = tmp_path / "accel"
    shutil.copytree(compile_cache._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    original = compile_cache.source_hash(copy)
    assert original == compile_cache.source_hash.__wrapped__(compile_cache._PACKAGE)
    fake_kernel = copy / "nn" / "recurrence" / "_op.py"
    fake_kernel.write_text(fake_kernel.read_text() + "\n# changed\n")
    assert compile_cache.source_hash.__wrapped__(copy) != original
    fake_kernel.rename(copy / "nn" / "recurrence" / "_op_renamed.py")
    assert compile_cache.source_hash.__wrapped__(copy) not in (original,)
