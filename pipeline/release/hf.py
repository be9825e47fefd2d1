"""`pico convert --format hf`: a release that Hugging Face `transformers` loads as custom code.

    config.json              PicoConfig: model_type "pico", architectures, auto_map, torch_dtype and
                             the fields of pico's ModelConfig, plus `routing` (causal by default)
    model.safetensors        the weights, named `model.<pico name>`; metadata: the training record
    configuration_pico.py    pico/model/config.py's text + PicoConfig (templates/)
    modeling_pico.py         the text of pico's network and decoder modules (pico.py, generate.py and
                             what they import), copied at convert time, + PicoForCausalLM (templates/)
    tokenizer.json           byte tokenizer: id b is byte b, then <bos> 256, <eos> 257, <pad> 258;
    tokenizer_config.json    encoding prepends <eos> (pico's start of text); invalid UTF-8 decodes
                             to U+FFFD; text that spells "<eos>" stays bytes (split_special_tokens)
    generation_config.json   greedy, stops at <eos>, never emits <bos>/<pad> (and generate() at max_seq_len)
    README.md, SHA256SUMS    the model card (with the three lines below) and checksums

    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    print(tok.decode(model.generate(**tok("The ", return_tensors="pt"), max_new_tokens=64)[0], skip_special_tokens=True))

Why the model code is copied, not written again: one home per concept. The network that
transformers runs is pico's own source text of the converting pico (its imports rewritten to
point inside the two files), so the HF logits are pico's logits by construction; the test holds
them to fp32 `assert_close`. The user needs transformers and torch, never pico.

Incremental decoding: `generate()` runs pico's own Decoder (model/generate.py: a window-bounded
ring per local layer, a cache of routed positions per latent layer), feeding only the new byte
each step, exactly as `pico generate --no-speculative` does, so greedy output is the same bytes.
The decoder state lives for one generate() call rather than in `past_key_values`: transformers'
Cache classes hold keys/values of every position per layer, which is not what pico caches. With
`use_cache=False` each step recomputes the
prefix with the full forward instead; `model(ids)` outside generate() is always the full forward.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

from pico.configs.errors import UserError

FORMAT_HF = "pico-hf"  # config.json's "pico_format": marks a directory `pico convert` may replace
CODE_CONFIG = "configuration_pico.py"
CODE_MODEL = "modeling_pico.py"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION = "generation_config.json"
TEMPLATES = Path(__file__).parent / "templates"
CONFIG_MODULE = "pico.model.config"  # copied into configuration_pico.py
REBUILT_BUFFERS = ("local_slopes", "latent_slopes")  # non-persistent buffers rebuild_buffers() recomputes


def entries() -> tuple[str, ...]:
    """The modules the export copies, with what they import: the network, its decoder and every router
    (a router registers itself when its module runs, so each one's file is copied)."""
    import pico.model.routers as routers

    found = sorted(m.name for m in pkgutil.iter_modules(routers.__path__))
    return ("pico.model.pico", "pico.model.generate", *(f"pico.model.routers.{m}" for m in found))
SPECIAL_TOKENS = {256: "<bos>", 257: "<eos>", 258: "<pad>"}

USE_LINES = [
    "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
    "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
    'print(tok.decode(model.generate(**tok("The ", return_tensors="pt"), max_new_tokens=64)[0], '
    "skip_special_tokens=True))",
]


# ----------------------------------------------------------------------------- what can be exported


def check_supported(model_cfg) -> None:
    """Refuse, with the reason, a model the HF code cannot run as pico does."""
    from pico.model.routers.base import validate_config

    try:
        validate_config(model_cfg)
    except ValueError as e:
        raise UserError(f"--format hf: {e}; release it in pico's format (--format pico)") from None
    unknown = [n for n in _non_persistent_buffers(model_cfg) if n.rsplit(".", 1)[-1] not in REBUILT_BUFFERS]
    if unknown:
        raise UserError(f"--format hf: the network has non-persistent buffers {unknown} that the Hugging Face code "
                        f"does not rebuild after from_pretrained (it rebuilds {', '.join(REBUILT_BUFFERS)}); "
                        "release it in pico's format (--format pico)")
    model_source()  # refuses model code that imports outside torch, the standard library and pico.model


def _non_persistent_buffers(model_cfg) -> list[str]:
    import torch

    from pico.model import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return sorted(f"{prefix}.{b}".lstrip(".") for prefix, m in model.named_modules()
                  for b in m._non_persistent_buffers_set)


# ----------------------------------------------------------------------------- source bundle


def model_source() -> tuple[str, str]:
    """Text of (configuration_pico.py, modeling_pico.py): pico's model modules, copied, then the templates."""
    from pico.pipeline.release.load import pico_version

    config_deps = _dependencies(CONFIG_MODULE)
    if config_deps != [CONFIG_MODULE]:
        raise UserError(f"--format hf: {CONFIG_MODULE} imports {config_deps[:-1]}; the export needs it self-contained")
    bundled = [m for m in dict.fromkeys(m for e in entries() for m in _dependencies(e)) if m != CONFIG_MODULE]
    _check_names([CONFIG_MODULE], "configuration_pico.py.tmpl")
    _check_names([CONFIG_MODULE, *bundled], "modeling_pico.py.tmpl")  # config names are imported there too
    head = ('"""{what} of Pico for Hugging Face transformers, written by `pico convert --format hf` (pico {v}).\n\n'
            "The sections below are the text of pico's own modules, with their imports of one another\n"
            "pointed inside this release:\n\n    {mods}\n\n"
            'The last section is the transformers wrapper."""\n\n'
            "from __future__ import annotations\n")
    config = head.format(what="Configuration", v=pico_version(), mods=_path(CONFIG_MODULE))
    config += _section(CONFIG_MODULE) + ("\n\nMODEL_FIELDS = {f.name: f.default if f.default is not dataclasses.MISSING "
                                         "else f.default_factory() for f in dataclasses.fields(ModelConfig)}\n")
    config = config.replace("from __future__ import annotations\n", "from __future__ import annotations\n\nimport dataclasses\n", 1)
    config += (TEMPLATES / "configuration_pico.py.tmpl").read_text()
    modeling = head.format(what="Network", v=pico_version(), mods="\n    ".join(_path(m) for m in bundled))
    modeling += "".join(_section(m) for m in bundled) + (TEMPLATES / "modeling_pico.py.tmpl").read_text()
    for name, text in (("configuration_pico.py", config), ("modeling_pico.py", modeling)):
        compile(text, name, "exec")  # a bundling mistake fails here, at convert time, not on the user's side
    return config, modeling


def _path(module: str) -> str:
    return module.removeprefix("pico.").replace(".", "/") + ".py"


def _file(module: str) -> Path:
    return Path(importlib.import_module(module).__file__)


def _pico_imports(tree: ast.AST, where: str) -> list[tuple[ast.ImportFrom, list[tuple[ast.alias, str]]]]:
    """Every import of pico code in tree (also inside functions): (node, [(name, its pico.model module)])."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "pico" or a.name.startswith("pico.") for a in node.names):
            raise UserError(f"--format hf: {where}:{node.lineno} uses `import pico...`; the export can only copy "
                            "`from pico.model.X import name` imports")
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("pico"):
            continue
        if node.module == "pico.model":  # the package's lazy names: their home modules
            homes = importlib.import_module("pico.model")._HOME
            if any(a.name not in homes for a in node.names):
                raise UserError(f"--format hf: {where}:{node.lineno} imports a pico.model name the export cannot place")
            names = [(a, f"pico.model.{homes[a.name]}") for a in node.names]
        elif node.module.startswith("pico.model."):
            names = [(a, node.module) for a in node.names]
        else:
            raise UserError(f"--format hf: {where}:{node.lineno} imports {node.module}; the Hugging Face code can only "
                            "carry pico.model (torch and the standard library)")
        found.append((node, names))
    return found


def _dependencies(entry: str) -> list[str]:
    """entry and the pico.model modules it imports (transitively), each after its own imports."""
    order: list[str] = []

    def visit(module: str, stack: tuple[str, ...]) -> None:
        if module in order or module in stack:
            return
        tree = ast.parse(_file(module).read_text())
        for _, names in _pico_imports(tree, _path(module)):
            for _, m in names:
                visit(m, stack + (module,))
        order.append(module)

    visit(entry, ())
    return order


def _top_names(module: str) -> set[str]:
    names = set()
    for node in ast.parse(_file(module).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _check_names(modules: list[str], template: str) -> None:
    """Copied modules share one namespace: a name defined twice would silently shadow the first."""
    seen: dict[str, str] = {}
    tmpl = ast.parse((TEMPLATES / template).read_text())
    tmpl_names = {n.name for n in tmpl.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for module, names in [(m, _top_names(m)) for m in modules] + [(template, tmpl_names)]:
        for name in names:
            if name in seen:
                raise UserError(f"--format hf: {name!r} is defined in both {seen[name]} and {module}; the export "
                                "copies them into one file, so rename one of them")
            seen[name] = module


def _section(module: str) -> str:
    """The module's text with `from __future__` dropped and its pico imports rewritten:
    config names come from .configuration_pico, names of copied modules are already global."""
    text = _file(module).read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    edits = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            edits.append((node, ""))
    for node, names in _pico_imports(tree, _path(module)):
        config = [a.name if a.asname is None else f"{a.name} as {a.asname}" for a, m in names if m == CONFIG_MODULE]
        stmts = [f"from .configuration_pico import {', '.join(config)}"] if config else []
        stmts += [f"{a.asname} = {a.name}" for a, m in names if m != CONFIG_MODULE and a.asname not in (None, a.name)]
        if not stmts and node.col_offset:  # a nested import needs a statement in its place
            stmts = ["pass"]
        edits.append((node, " " * node.col_offset + "; ".join(stmts) if stmts else ""))
    for node, new in sorted(edits, key=lambda e: e[0].lineno, reverse=True):
        lines[node.lineno - 1:node.end_lineno] = [new] if new else []
    rule = "# " + "-" * 77
    return f"\n\n{rule}\n# {_path(module)}\n{rule}\n\n" + "\n".join(lines).strip("\n") + "\n"


# ----------------------------------------------------------------------------- tokenizer


def byte_chars() -> list[str]:
    """The character that stands for each byte in a `tokenizers` ByteLevel vocabulary (GPT-2's
    table): printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_json() -> dict[str, Any]:
    """A `tokenizers` tokenizer with ids = bytes: ByteLevel without the regex split, a BPE with no merges
    (every byte's character is its own token), the special ids after the bytes, <eos> prepended."""
    from pico.model.config import EOS

    special = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, s in SPECIAL_TOKENS.items()]
    start = SPECIAL_TOKENS[EOS]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {start: {"id": start, "ids": [EOS], "tokens": [start]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: b for b, c in enumerate(byte_chars())}, "merges": []},
    }


def tokenizer_config(model_cfg) -> dict[str, Any]:
    from pico.model.config import EOS, PAD

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[EOS],  # what starts a text is pico's EOS (as GPT-2's bos = eos)
        "eos_token": SPECIAL_TOKENS[EOS], "pad_token": SPECIAL_TOKENS[PAD],
        "split_special_tokens": True,  # text that spells "<eos>" is bytes, as in pico
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_cfg.max_seq_len,
    }


# ----------------------------------------------------------------------------- write


def hf_config(model_cfg, dtype: str) -> dict[str, Any]:
    """config.json: what AutoConfig / AutoModelForCausalLM read, and pico's ModelConfig fields."""
    from pico.model.config import EOS, PAD, VOCAB_SIZE
    from pico.pipeline.release.load import pico_version

    return {
        "model_type": "pico", "architectures": ["PicoForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_pico.PicoConfig",
                     "AutoModelForCausalLM": "modeling_pico.PicoForCausalLM"},
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "routing": "causal", **dataclasses.asdict(model_cfg),
        "vocab_size": VOCAB_SIZE, "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD,
        "tie_word_embeddings": False, "use_cache": True,
        "pico_format": FORMAT_HF, "pico_version": pico_version(),
    }


def generation_config(model_cfg) -> dict[str, Any]:
    """Greedy like `pico generate --temperature 0`: BOS and PAD are banned, EOS ends (the context limit
    is PicoForCausalLM.generate's stopping criterion, so max_new_tokens alone sets the length)."""
    from pico.model.config import BOS, EOS, PAD

    return {"do_sample": False, "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD,
            "suppress_tokens": [BOS, PAD], "use_cache": True}


def write_hf_release(tmp: Path, tensors: dict, model_cfg, training: dict[str, Any], dtype: str) -> None:
    """Every file of an HF release into tmp; tensors are pico's state dict already in `dtype`."""
    from pico.pipeline.release.files import canonical_json, model_card, write_safetensors
    from pico.configs.files import SUMS, sha256_file
    from pico.pipeline.release.load import CARD, CONFIG, WEIGHTS

    config_py, modeling_py = model_source()
    write_safetensors(tmp / WEIGHTS, {f"model.{k}": v for k, v in tensors.items()},
                      {"format": "pt", "pico_training": canonical_json(training)})
    files = {
        CONFIG: _dump(hf_config(model_cfg, dtype)),
        GENERATION: _dump(generation_config(model_cfg)),
        TOKENIZER: json.dumps(tokenizer_json(), ensure_ascii=False, indent=1) + "\n",
        TOKENIZER_CONFIG: _dump(tokenizer_config(model_cfg)),
        CODE_CONFIG: config_py, CODE_MODEL: modeling_py,
        CARD: hf_card(model_card(model_cfg, training, dtype, use=use_section(), files=FILES_NOTE)),
    }
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    names = [WEIGHTS, *files]
    (tmp / SUMS).write_text("".join(f"{sha256_file(tmp / n)}  {n}\n" for n in names))


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def use_section() -> list[str]:
    """The card's "Use" lines: the three lines a transformers user runs."""
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "DIR = 'path/to/this/directory'",
            *USE_LINES, "```", "",
            "`trust_remote_code=True` runs `modeling_pico.py`, which is pico's own model code copied at convert time "
            "(the tokenizer is plain `tokenizers`; AutoTokenizer asks for trust only because it reads `config.json`). "
            "`generate()` decodes incrementally with pico's own decoder (one new byte per step; routers it cannot "
            "decode incrementally, and `use_cache=False`, recompute the prefix each step) and its greedy output "
            "equals `pico generate --no-speculative`; contexts are at most `max_seq_len` bytes. Ids are bytes "
            "(0-255) and `<bos>` 256, `<eos>` 257, `<pad>` 258; the tokenizer prepends `<eos>`, pico's start of text. "
            "No padding: one prompt per call, or prompts of equal length.", ""]


FILES_NOTE = (f"`{CODE_CONFIG}` and `{CODE_MODEL}` (pico's model code and the transformers wrapper), `config.json`, "
              f"`model.safetensors` (training record in its metadata), `{TOKENIZER}` and `{TOKENIZER_CONFIG}` (the byte "
              f"tokenizer), `{GENERATION}`, this card, `SHA256SUMS` (`sha256sum -c SHA256SUMS`).")


def hf_card(card: str) -> str:
    """The model card with the Hub's front matter."""
    return "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- pico\n- byte-level\n---\n\n" + card


# ----------------------------------------------------------------------------- check


def is_hf_release(path: Path) -> bool:
    """config.json says pico wrote this HF release (so `pico convert` may replace it)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("pico_format") == FORMAT_HF
    except (OSError, ValueError, AttributeError):
        return False


def verify_hf_release(path: Path) -> None:
    """What pico can check of a written HF release without transformers: the checksums, that
    config.json rebuilds the ModelConfig, and that the weights are exactly that network's, by
    name and shape (the code compiled when it was generated; the tests load it with transformers)."""
    import torch
    from safetensors import safe_open

    from pico.model import build_model
    from pico.model.config import ModelConfig
    from pico.pipeline.release.load import checksum_errors, parse_model_config, read_checksums

    errors = checksum_errors(path, read_checksums(path))
    if errors:
        raise UserError(f"HF release {path} is corrupt: {'; '.join(errors)}")
    config = json.loads((path / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = parse_model_config({k: v for k, v in config.items() if k in fields}, path / "config.json")
    with torch.device("meta"):
        want = {f"model.{k}": tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        got = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    if got != want:
        raise UserError(f"HF release {path}: the weights are not the network of its config.json (missing "
                        f"{sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]})")
