"""`pico convert --format hf`: a directory a real `transformers` loads, equal to pico.

Every load runs with `local_files_only=True`, HF_HUB_OFFLINE=1 and sockets to anything but
loopback refused, so a test that would reach the Hub fails instead of downloading. The source
checkpoint is test_release's hand-laid ZeRO-0 one (tiny model, fast); the router variants are
written straight from `build_model` weights through the same writer convert uses.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "transformers" not in sys.modules:  # generated code is copied into this cache: keep it out of $HOME
    os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="pico-hf-modules-"))

transformers = pytest.importorskip("transformers")

from pico.configs.errors import UserError  # noqa: E402
from pico.pipeline.release import hf  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.pipeline.release.test_release import (make_zero0_checkpoint, probe_input, reference_model,  # noqa: E402
                                                 rewrite_sums)

HOME_PATH = "/home/alice/secret-corpus/shards/novels"  # a local path no release may carry


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection beyond loopback is an error (the Hub must never be asked)."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            raise OSError(f"test_hf: network access to {address} refused")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The ZeRO-0 checkpoint, its training data recorded under an absolute local path."""
    step = make_zero0_checkpoint(tmp_path_factory.mktemp("hfckpt"))
    state = json.loads((step / "pico_state.json").read_text())
    state["config"]["data"]["train"] = [HOME_PATH]
    state["config"]["data"]["val"] = "~/corpus/val"
    (step / "pico_state.json").write_text(json.dumps(state))
    return step


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory) -> Path:
    from pico.pipeline.release.convert import convert

    return convert(ckpt, tmp_path_factory.mktemp("hfrel") / "hf", format="hf")


def load(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, local_files_only=True, **kw).eval()


def tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


# ----------------------------------------------------------------------------- layout and metadata


def test_layout_config_and_card(hf_dir):
    names = sorted(p.name for p in hf_dir.iterdir())
    assert names == sorted(["config.json", "model.safetensors", "configuration_pico.py", "modeling_pico.py",
                            "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
                            "SHA256SUMS"])
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "pico" and config["architectures"] == ["PicoForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_pico.PicoConfig",
                                  "AutoModelForCausalLM": "modeling_pico.PicoForCausalLM"}
    assert config["torch_dtype"] == "float32" and config["routing"] == "causal"
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 257 and gen["suppress_tokens"] == [256, 258] and gen["do_sample"] is False
    card = (hf_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and all(line in card for line in hf.USE_LINES)
    header = safetensors_header(hf_dir / "model.safetensors")
    assert "model.embed.weight" in header and "model.unembed.weight" in header
    # the user's side needs no pico: neither file imports it
    for name in ("configuration_pico.py", "modeling_pico.py"):
        tree = ast.parse((hf_dir / name).read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [m for m in mods if m and m.split(".")[0] == "pico"], name


def test_no_release_format_carries_local_paths(ckpt, hf_dir, tmp_path):
    from pico.pipeline.release.convert import convert

    pico_dir = convert(ckpt, tmp_path / "pico")
    for release in (pico_dir, hf_dir):
        meta = json.loads(safetensors_header(release / "model.safetensors")["__metadata__"]["pico_training"])
        assert meta["data"]["train"] == ["novels"] and meta["data"]["val"] == "val", release
        for f in release.iterdir():
            text = f.read_bytes()
            assert b"/home/alice" not in text and b"~/corpus" not in text and str(ckpt).encode() not in text, f


def test_convert_hf_is_idempotent(ckpt, hf_dir, tmp_path):
    from pico.pipeline.release.convert import convert

    again = convert(ckpt, tmp_path / "again", format="hf")
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in hf_dir.iterdir()}


# ----------------------------------------------------------------------------- the model


def test_logits_equal_pico_after_from_pretrained(ckpt, hf_dir):
    """The ALiBi slopes are non-persistent: from_pretrained must rebuild them, or the logits are off by nats."""
    from pico.model.attention import alibi_slopes

    ref, _ = reference_model(ckpt)
    model = load(hf_dir)
    torch.testing.assert_close(model.model.local_slopes, alibi_slopes(ref.cfg.n_heads))
    torch.testing.assert_close(model.model.latent.latent_slopes, alibi_slopes(ref.cfg.n_latent_heads))
    ids = probe_input(ref.cfg.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids, routing="causal").logits)
        labels_loss = model(ids, labels=ids).loss
    assert torch.isfinite(labels_loss)


def test_without_the_rebuild_the_logits_are_wrong(ckpt, hf_dir, tmp_path):
    """The test above is not vacuous: the same directory with rebuild_buffers() disabled loads
    slopes from uninitialised memory, and its logits are not pico's."""
    import shutil

    ref, _ = reference_model(ckpt)
    broken = Path(shutil.copytree(hf_dir, tmp_path / "broken"))
    code = (broken / "modeling_pico.py").read_text()
    marker = "    with torch.no_grad():\n        model.local_slopes.copy_("
    assert marker in code
    (broken / "modeling_pico.py").write_text(code.replace(marker, "    return\n" + marker, 1))
    model = load(broken)
    from pico.model.attention import alibi_slopes

    if torch.equal(model.model.local_slopes, alibi_slopes(ref.cfg.n_heads)):
        pytest.skip("the uninitialised memory happened to hold the right slopes")
    ids = probe_input(ref.cfg.max_seq_len)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, ref(ids, routing="causal").logits, atol=1e-3)


def pico_cli(capsysbinary, *args: str) -> bytes:
    from pico.pipeline.cli import main

    capsysbinary.readouterr()
    assert main(list(args)) == 0
    return capsysbinary.readouterr().out


def hf_bytes(model, tok, prompt: str, n: int, **kw) -> bytes:
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, **kw)[0, enc.input_ids.shape[1]:].tolist()
    return bytes(out[:-1] if out and out[-1] == 257 else out)


@pytest.mark.parametrize("use_cache", [True, False], ids=["pico-decoder", "recompute"])
def test_greedy_generate_equals_pico_generate(ckpt, hf_dir, capsysbinary, use_cache):
    model, tok = load(hf_dir), tokenizer(hf_dir)
    for prompt, n in (("The ", 40), ("", 25), ("x" * 30, 100)):  # the last one stops at the context (64) in HF
        want = pico_cli(capsysbinary, "generate", "--model", str(ckpt), "--prompt", prompt, "--max-bytes", str(n),
                        "--no-speculative", "--raw")
        got = hf_bytes(model, tok, prompt, n, use_cache=use_cache)
        assert got == want[:len(got)], prompt  # pico generate streams on past the context; HF stops there
    assert len(got) == 64 - 31 and len(want) == 100  # HF: start id + 30 prompt bytes + 33 generated


def test_generate_past_the_context_warns_once(hf_dir):
    import warnings

    model, tok = load(hf_dir), tokenizer(hf_dir)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hf_bytes(model, tok, "x" * 30, 100, min_new_tokens=100)  # context 64: stops after 33 bytes
        hf_bytes(model, tok, "The ", 5)  # within the context: silent
    ours = [w for w in seen if "max_seq_len" in str(w.message)]
    assert len(ours) == 1 and "pico generate" in str(ours[0].message)


def test_generate_takes_the_prompt_every_way_transformers_does(hf_dir):
    import torch

    model, tok = load(hf_dir), tokenizer(hf_dir)
    ids = tok("The ", return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=6)
    assert torch.equal(model.generate(inputs=ids, max_new_tokens=6), want)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6), want)
    with pytest.raises(ValueError, match="empty input_ids"):
        model.generate(ids[:, :0], max_new_tokens=2)
    with pytest.raises(ValueError, match="does not fit the model's context"):
        model.generate(inputs=torch.full((1, 64), 65), max_new_tokens=2)


def test_generate_feeds_one_new_byte_per_step(hf_dir):
    """The decoder path is incremental: a prefill of the prompt, then one id per forward pass."""
    model, tok = load(hf_dir), tokenizer(hf_dir)
    widths = []
    model.model.embed.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    hf_bytes(model, tok, "The ", 10, min_new_tokens=10)
    assert widths == [5] + [1] * 9  # <eos> + 4 prompt bytes; the 10th byte needs no pass


def test_readme_lines_run_as_written(ckpt, hf_dir, capsysbinary):
    """The three lines of the README's "Hugging Face export" print what `pico generate` prints."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Hugging Face export", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.startswith(("#", "from ", "import ", "DIR = "))]
    assert lines == hf.USE_LINES  # the README and the model card show the same lines
    ctx = json.loads((ckpt / "pico_state.json").read_text())["config"]["model"]["max_seq_len"]
    n = min(64, ctx - 1 - len("The "))  # HF stops at the context; pico generate streams on past it
    want = pico_cli(capsysbinary, "generate", "--model", str(ckpt), "--prompt", "The ", "--max-bytes", str(n),
                    "--no-speculative")
    assert '"path/to/release"' in code
    exec(code.replace('"path/to/release"', repr(str(hf_dir))), {})
    assert capsysbinary.readouterr().out == want


def test_text_generation_pipeline(hf_dir):
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(hf_dir), trust_remote_code=True)  # offline: HF_HUB_OFFLINE=1
    out = gen("The ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("The ")


def test_padding_is_refused(hf_dir):
    model = load(hf_dir)
    with pytest.raises(ValueError, match="padding"):
        model(torch.tensor([[257, 1, 2]]), attention_mask=torch.tensor([[0, 1, 1]]))


# ----------------------------------------------------------------------------- the tokenizer


def test_byte_tokenizer(hf_dir):
    tok = tokenizer(hf_dir)
    text = "héllo, wörld <eos> \x00\n"
    ids = tok(text).input_ids
    assert ids == [257, *text.encode()]  # start of text, then the bytes; "<eos>" spelled out stays bytes
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<bos>")) == (257, 258, 256)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # invalid UTF-8 decodes as Python's errors="replace" does
        raw = bytes(torch.randint(0, 256, (12,), generator=g).tolist())
        assert tok.decode(list(raw)) == raw.decode("utf-8", "replace"), raw


# ----------------------------------------------------------------------------- every router, bf16


def tiny_cfg(**kw):
    from pico.model.config import ModelConfig

    shape = dict(d_local=32, n_heads=2, n_kv_heads=1, window=16, n_in=1, n_out=1, d_latent=64, n_latent=1,
                 n_latent_heads=4, n_latent_kv_heads=2, n_predict=2, max_seq_len=48)
    return ModelConfig(**{**shape, **kw})


TRAINING = {"checkpoint": "step_000000", "n_params": 0, "flops_per_byte": {"training": 0.0, "inference": 0.0},
            "data": {}, "eval": {}}


def export(cfg, out: Path, dtype: str = "fp32", seed: int = 0):
    from pico.model import build_model
    from pico.pipeline.release.convert import _cast

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking router: a non-zero calibration cut-off, scores off zero
        for name, buf in model.named_buffers():
            if name.endswith("cutoff"):
                buf.fill_(0.01)
    hf.check_supported(cfg)
    out.mkdir()
    hf.write_hf_release(out, _cast(model.state_dict(), dtype), cfg, TRAINING, dtype)
    return model


@pytest.mark.parametrize("kw", [dict(router="learned", router_prior=2.0), dict(router="spacelike"), dict(router="chunk"),
                                dict(router="chunk", dechunk=True), dict(router="entropy"),
                                dict(router="spacelike", pooled_inputs=True, ngram_orders=[2, 3]),
                                dict(router="none", n_in=2, n_latent=0, ngram_orders=[2])], ids=str)
def test_every_router_gives_pico_logits(kw, tmp_path):
    cfg = tiny_cfg(**kw)
    ref = export(cfg, tmp_path / "hf")
    ids = probe_input(cfg.max_seq_len)
    ids[:, ::5] = 32  # spaces, so that the spacelike rule routes
    model = load(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids, routing="causal").logits)
    # generate(): pico's decoder where it runs (else recompute), the same bytes as recomputing
    prompt = torch.tensor([[257, *b"Hi there, "]])
    cached, full = (model.generate(prompt, max_new_tokens=12, min_new_tokens=12, use_cache=c) for c in (True, False))
    assert torch.equal(cached, full)


def test_bf16_release_loads_in_bf16(tmp_path):
    cfg = tiny_cfg(router="learned")
    ref = export(cfg, tmp_path / "hf", dtype="bf16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load(tmp_path / "hf", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    for name, p in ref.state_dict().items():
        assert torch.equal(model.state_dict()[f"model.{name}"], p.to(torch.bfloat16)), name


# ----------------------------------------------------------------------------- bad input


def test_missing_weight_fails_from_pretrained(hf_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = Path(shutil.copytree(hf_dir, tmp_path / "bad"))
    state = load_file(bad / "model.safetensors")
    del state["model.blocks_in.0.attn.qkv_proj.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"missing \['model.blocks_in.0.attn.qkv_proj.weight'\]"):
        load(bad)
    with pytest.raises(UserError, match="model.safetensors has sha256"):  # pico's own check sees it first
        hf.verify_hf_release(bad)
    rewrite_sums(bad)
    with pytest.raises(UserError, match=r"not the network of its config.json \(missing \['model.blocks_in.0"):
        hf.verify_hf_release(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):  # transformers' own error: no weights file
        load(bad)


def test_unsupported_router_is_refused_with_one_line(ckpt, tmp_path, capsys, monkeypatch):
    cfg = tiny_cfg(router="learned")
    cfg.router = "mystery"  # a router this pico does not have
    with pytest.raises(UserError, match="model.router='mystery' is not a router") as e:
        hf.check_supported(cfg)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(hf, "REBUILT_BUFFERS", ("local_slopes",))  # a buffer the HF code would leave empty
    with pytest.raises(UserError, match=r"non-persistent buffers \['latent.latent_slopes'\]"):
        hf.check_supported(tiny_cfg(router="learned"))
    from pico.pipeline.cli import main

    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latent_slopes" in err[0]
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_replace_what_is_not_an_hf_export(ckpt, tmp_path):
    from pico.pipeline.release.convert import convert

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    pico_release = convert(ckpt, tmp_path / "pico")
    for out in (tmp_path / "busy", pico_release):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(UserError, match="is not a Hugging Face export written by pico"):
            convert(ckpt, out, format="hf")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_json_prints_one_object(ckpt, tmp_path, capsys):
    from pico.pipeline.cli import main

    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--format", "hf", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "hf" and out["dtype"] == "fp32" and "modeling_pico.py" in out["files"]


# ----------------------------------------------------------------------------- the source bundle


FAKE = '''"""A module as pico.model might grow one."""

from __future__ import annotations

import torch

from pico.model import EOS, build_model
from pico.model.config import (PAD,
                               VOCAB_SIZE as V)


def f():
    from pico.model.flops import flops_per_byte
    from pico.model.pico import Pico as P
    return flops_per_byte, P, EOS, PAD, V, build_model, torch
'''


def test_bundle_rewrites_every_kind_of_pico_import(tmp_path, monkeypatch):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    real = hf._file
    monkeypatch.setattr(hf, "_file", lambda m: fake if m == "pico.model.fake" else real(m))
    text = hf._section("pico.model.fake")
    compile(text, "fake", "exec")
    assert "from __future__" not in text and "from pico" not in text
    assert "from .configuration_pico import EOS\n" in text  # config names from the config file, the rest global
    assert "from .configuration_pico import PAD, VOCAB_SIZE as V\n" in text
    assert "    pass\n    P = Pico\n" in text  # nested: a statement stays where the import was
    assert hf._dependencies("pico.model.fake")[-1] == "pico.model.fake"


def test_bundle_refuses_imports_it_cannot_carry_and_clashing_names(tmp_path, monkeypatch):
    fake = tmp_path / "fake.py"
    real = hf._file
    monkeypatch.setattr(hf, "_file", lambda m: fake if m == "pico.model.fake" else real(m))
    fake.write_text("def g():\n    from pico.pipeline.dist import print0\n")
    with pytest.raises(UserError, match="fake.py:2 imports pico.pipeline.dist"):
        hf._dependencies("pico.model.fake")
    fake.write_text("def build_model():\n    pass\n")  # also defined in model/pico.py
    with pytest.raises(UserError, match="'build_model' is defined in both"):
        hf._check_names(["pico.model.pico", "pico.model.fake"], "modeling_pico.py.tmpl")
