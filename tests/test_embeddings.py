"""Textual-inversion files: the three formats read without torch, the wrong-width error, refusal of foreign pickles.
Files are written here with torch.save / safetensors exactly as A1111, kohya and diffusers write them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from rtsd.adapters.embeddings import EmbeddingError, EmbeddingStore, read_vectors
from rtsd.adapters.torch_zip import TorchFileError, load
from rtsd.tokenizer import Tokenizer

RNG = np.random.default_rng(0)


def a1111_pt(path, vectors):
    """What A1111's textual_inversion.Embedding.save writes (torch.save of a dict around string_to_param)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(vectors))},
                "name": path.stem, "step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, path)
    return path


def emb_params(path, vectors):
    save_file({"emb_params": vectors}, str(path))
    return path


def diffusers_bin(path, vectors, key="<concept>"):
    torch.save({key: torch.from_numpy(vectors[0] if len(vectors) == 1 else vectors)}, path)
    return path


@pytest.mark.parametrize("writer,count", [(a1111_pt, 2), (emb_params, 3), (diffusers_bin, 1), (a1111_pt, 1)])
def test_each_format_reads_to_the_stored_vectors(tmp_path, writer, count):
    vectors = RNG.standard_normal((count, 768), dtype=np.float32)
    path = writer(tmp_path / f"concept{writer.__name__}.{'safetensors' if writer is emb_params else 'pt'}", vectors)
    np.testing.assert_array_equal(read_vectors(path), vectors)


def test_half_bfloat16_and_parameters_read_as_torch_does(tmp_path):
    base = torch.randn(4, 16)
    torch.save({"a": base.half(), "b": base.bfloat16(), "c": base.T, "d": torch.nn.Parameter(base[1:3])},
               tmp_path / "x.pt")
    data = load(tmp_path / "x.pt")
    for key, expected in (("a", base.half().float()), ("b", base.bfloat16().float()), ("c", base.T), ("d", base[1:3])):
        np.testing.assert_array_equal(np.asarray(data[key], np.float32), expected.numpy())


def test_pickles_with_other_objects_and_old_formats_are_refused(tmp_path):
    import collections

    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "hook": collections.Counter()}, tmp_path / "evil.pt")
    with pytest.raises(TorchFileError, match=r"Python objects \(collections.Counter\).*refusing"):
        load(tmp_path / "evil.pt")
    torch.save({"emb_params": torch.zeros(1, 8)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(EmbeddingError, match="neither a torch.save zip nor a .safetensors"):
        read_vectors(tmp_path / "old.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(EmbeddingError):
        read_vectors(tmp_path / "text.pt")
    save_file({"weight": np.zeros((2, 8), np.float32), "bias": np.zeros(8, np.float32)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        read_vectors(tmp_path / "lora.safetensors")


@pytest.mark.parametrize("width,family,made_for", [
    (1024, "SD 2.x", "SD 1.x (CLIP ViT-L, 768-d)"), (768, "SD 1.x", "SD 2.x (OpenCLIP ViT-H, 1024-d)")])
def test_wrong_width_names_the_family_it_was_made_for(tmp_path, width, family, made_for):
    other = 1792 - width
    path = emb_params(tmp_path / "style.safetensors", RNG.standard_normal((2, other), dtype=np.float32))
    store = EmbeddingStore(width, family, Tokenizer.default().encode_pieces)
    with pytest.raises(EmbeddingError) as info:
        store.load(path)
    assert str(info.value) == (f"style.safetensors was made for {made_for}: its vectors are {other}-d, this {family} "
                               f"model needs {width}-d; use an embedding trained for {family}")
    assert "style" not in store


def test_directory_loading_and_default_tokens(tmp_path):
    (tmp_path / "sub").mkdir()
    a1111_pt(tmp_path / "easynegative.pt", RNG.standard_normal((8, 64), dtype=np.float32))
    emb_params(tmp_path / "sub" / "mystyle.safetensors", RNG.standard_normal((2, 64), dtype=np.float32))
    (tmp_path / "notes.txt").write_text("not an embedding")
    store = EmbeddingStore(64, "test", Tokenizer.default().encode_pieces)
    assert sorted(e.token for e in store.load_dir(tmp_path)) == ["easynegative", "mystyle"]
    assert store["easynegative"].describe()["vectors"] == 8 and len(store) == 2
    store.load(tmp_path / "easynegative.pt", token="neg2")
    assert "neg2" in store and store["neg2"].vectors.shape == (8, 64)


def test_embedding_files_load_with_torch_unimportable(tmp_path):
    a1111_pt(tmp_path / "x.pt", RNG.standard_normal((2, 32), dtype=np.float32))
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        from rtsd.adapters.embeddings import read_vectors
        print(read_vectors({str(tmp_path / "x.pt")!r}).shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "(2, 32)" in done.stdout, done.stderr[-2000:]
