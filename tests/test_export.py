"""Hugging Face export and import: self-contained remote code loaded in a fresh process, logit and greedy
generation parity with our model, incremental decoding through `generate()`, left padding, sharded
streaming writes, tokenizer loading, and a bitwise import round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from engram_pretrain.export.exporter import export_model, export_tensors, model_tensors, parse_size
from engram_pretrain.export.importer import import_hf, load_model
from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.memory.compression import CompressionMap, build_compression_map
from engram_pretrain.model.config import ModelConfig
from engram_pretrain.model.transformer import EngramMoEModel

REPO = Path(__file__).resolve().parents[1]
TEXT = ["The quick brown fox jumps over the lazy dog.", "Engram memory hashes N-grams of token ids!",
        "the THE The thé  tab\tand new\nline", "0123456789 + 42 = 0042"] * 10


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer trained here, saved as a PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    build_compression_map(fast).save(out / "compression.npz")
    return out


def _cmap(tokenizer_dir: Path) -> CompressionMap:
    return CompressionMap.load(tokenizer_dir / "compression.npz")


def make_model(tokenizer_dir: Path, kind: str = "gqa", tie: bool = False, compress: bool = True,
               seed: int = 0) -> EngramMoEModel:
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    cfg = ModelConfig(vocab_size=len(tok) + 4, hidden_size=32, num_layers=3, max_seq_len=64,
                      tie_embeddings=tie)
    cfg.attention.kind, cfg.attention.num_heads = kind, 4
    if kind == "gqa":
        cfg.attention.num_kv_heads = 2
    else:
        cfg.attention.head_dim, cfg.attention.rope_head_dim, cfg.attention.kv_lora_rank = 8, 8, 16
    cfg.moe.num_routed_experts, cfg.moe.top_k, cfg.moe.expert_dim = 4, 2, 16
    e = cfg.engram
    e.layers, e.num_heads, e.d_mem, e.base_table_size, e.conv_zero_init = [0, 2], 2, 16, [31, 37], False
    e.pad_token_id, e.token_compression = tok.pad_token_id, compress
    addressing = build_addressing(cfg, _cmap(tokenizer_dir))
    torch.manual_seed(seed)
    model = EngramMoEModel(cfg, addressing).eval()
    for name, p in model.named_parameters():  # move mHC gates off their tiny init
        if name.endswith("alpha"):
            torch.nn.init.normal_(p, std=0.5)
    return model


def greedy(model: EngramMoEModel, ids: torch.Tensor, steps: int, eos: int, pad: int) -> torch.Tensor:
    """Our greedy decoding by full recomputation (rows that emitted EOS continue with `pad`)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
    return ids


@pytest.fixture(scope="module")
def exported(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EngramMoEModel, Path]:
    model = make_model(tokenizer_dir)
    out = tmp_path_factory.mktemp("exports") / "engram-gqa"
    export_model(model, build_addressing(model.config, _cmap(tokenizer_dir)), tokenizer_dir,
                 tokenizer_dir / "compression.npz", out, max_shard_size="40KB")
    return model, out


FRESH_PROCESS_SCRIPT = r'''
import importlib.util, os, sys
# the repo is pip-installed in editable mode: drop its finder so only the export folder can provide code
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__")]
assert "" not in sys.path and REPO not in [os.path.abspath(p) for p in sys.path], sys.path
assert importlib.util.find_spec("engram_pretrain") is None, "engram_pretrain is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, data = sys.argv[1], sys.argv[2]
inp = torch.load(data)
model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
model.eval()
assert not any(info.values()), info
assert not any(m.startswith("engram_pretrain") for m in sys.modules)
tok = AutoTokenizer.from_pretrained(out)
import transformers
res = {"version": transformers.__version__, "type": type(model).__name__,
       "ids": tok(inp["text"])["input_ids"], "decoded": tok.decode(inp["ids"][0])}
with torch.no_grad():
    res["logits"] = model(inp["ids"]).logits
    res["gen_cache"] = model.generate(inp["ids"], attention_mask=torch.ones_like(inp["ids"]),
                                      max_new_tokens=8, do_sample=False, use_cache=True)
    res["gen_nocache"] = model.generate(inp["ids"], attention_mask=torch.ones_like(inp["ids"]),
                                        max_new_tokens=8, do_sample=False, use_cache=False)
    tok.padding_side = "left"
    batch = tok(inp["prompts"], return_tensors="pt", padding=True)
    res["gen_padded"] = model.generate(**batch, max_new_tokens=6, do_sample=False)
    res["padded_width"] = batch["input_ids"].shape[1]
# accelerate's dispatch: a memory budget of half the weights -> blocks (with their Engram tables) on disk
import json, tempfile
size = json.load(open(os.path.join(out, "model.safetensors.index.json")))["metadata"]["total_size"]
big = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map="auto",
                                           max_memory={"cpu": size // 2}, offload_folder=tempfile.mkdtemp())
big.eval()
res["device_map"] = dict(big.hf_device_map)
res["offloaded_tables"] = sorted(n for n, p in big.named_parameters() if n.endswith("table.weight")
                                 and p.device.type == "meta")
with torch.no_grad():
    res["offload_logits"] = big(inp["ids"]).logits
    res["offload_gen"] = big.generate(inp["ids"], attention_mask=torch.ones_like(inp["ids"]),
                                      max_new_tokens=8, do_sample=False)
torch.save(res, data + ".out")
'''


def test_fresh_process_load_generate_and_tokenizer(exported: tuple[EngramMoEModel, Path],
                                                   tmp_path: Path) -> None:
    model, out = exported
    ids = torch.randint(0, model.config.vocab_size - 4, (2, 10))
    prompts = ["The quick brown fox", "Engram memory hashes N-grams of token ids", "0"]
    data = tmp_path / "inputs.pt"
    torch.save({"ids": ids, "text": TEXT[0], "prompts": prompts}, data)
    script = tmp_path / "load.py"
    script.write_text(f"REPO = {str(REPO)!r}\n" + FRESH_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-I", str(script), str(out), str(data)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(str(data) + ".out")
    assert res["type"] == "EngramMoEForCausalLM"

    ours = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert res["ids"] == ours(TEXT[0])["input_ids"]
    assert res["decoded"] == ours.decode(ids[0])

    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(res["logits"], want, rtol=0, atol=1e-5)

    cfg = json.loads((out / "generation_config.json").read_text())
    eos, pad = cfg["eos_token_id"], cfg["pad_token_id"]
    ref = greedy(model, ids, 8, eos, pad)
    version = f"transformers {res['version']}"
    assert torch.equal(res["gen_cache"], ref), f"{version}: cached generate() != greedy decoding"
    assert torch.equal(res["gen_nocache"], ref), f"{version}: uncached generate() != greedy decoding"

    assert "disk" in res["device_map"].values() and "cpu" in res["device_map"].values(), res["device_map"]
    assert res["offloaded_tables"], res["device_map"]  # at least one Engram table lives on disk
    torch.testing.assert_close(res["offload_logits"], res["logits"], rtol=0, atol=0, msg=version)
    assert torch.equal(res["offload_gen"], ref), f"{version}: offloaded generate() != greedy decoding"

    width = res["padded_width"]
    for i, text in enumerate(prompts):
        prompt = torch.tensor([ours(text)["input_ids"]])
        row = greedy(model, prompt, 6, eos, pad)[0, prompt.shape[1]:]
        got = res["gen_padded"][i, width:width + len(row)]
        assert torch.equal(got, row), (i, got, row)


def test_export_folder_layout_and_streamed_shards(exported: tuple[EngramMoEModel, Path]) -> None:
    model, out = exported
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "engram_moe"
    assert hf["auto_map"] == {"AutoConfig": "hf_config.EngramMoEConfig",
                              "AutoModelForCausalLM": "modeling_engram_moe.EngramMoEForCausalLM"}
    assert hf["max_position_embeddings"] == model.config.max_seq_len
    for name in ("modeling_engram_moe.py", "hf_config.py", "transformer.py", "cache.py", "tokenizer.json",
                 "engram_compression_map.npz", "engram_hashing.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert "from ..model" not in (out / "modeling_engram_moe.py").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            tensors = [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        assert nbytes <= 40_000 or len(tensors) == 1  # one oversized tensor gets a shard of its own
        total += nbytes
    state = model.state_dict()
    assert set(index["weight_map"]) == {f"model.{k}" for k in state}
    want_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total == want_bytes
    hashing = json.loads((out / "engram_hashing.json").read_text())
    assert hashing["layer_multipliers"]["2"] == model.addresser.multipliers_2.tolist()
    from engram_pretrain.cli import main

    assert main(["check-export", str(out)]) == 0


def test_import_round_trip_is_bitwise(exported: tuple[EngramMoEModel, Path]) -> None:
    model, out = exported
    cfg, state, addressing = import_hf(out)
    assert cfg == model.config
    want = model.state_dict()
    assert set(state) == set(want)
    for name, tensor in want.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert addressing is not None and addressing.compression_lookup == model.addresser.compression.tolist()
    rebuilt = load_model(out).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind, tie, compress", [("mla", True, False), ("gqa", False, True)])
def test_in_process_parity_incremental_and_beams(tokenizer_dir: Path, tmp_path: Path, kind: str, tie: bool,
                                                 compress: bool) -> None:
    model = make_model(tokenizer_dir, kind=kind, tie=tie, compress=compress, seed=1)
    addressing = None if tie else build_addressing(model.config, _cmap(tokenizer_dir))  # None: from buffers
    out = export_model(model, addressing, tokenizer_dir, tokenizer_dir / "compression.npz",
                       tmp_path / f"engram-{kind}-{tie}")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    hf, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info
    if tie:
        assert hf.model.lm_head.weight is hf.model.embed.weight
    ids = torch.randint(0, model.config.vocab_size - 4, (2, 11))
    with torch.no_grad():
        full = hf(ids).logits
        torch.testing.assert_close(full, model(ids).logits, rtol=0, atol=1e-5)
        step = hf(ids[:, :6], use_cache=True)
        logits = [step.logits]
        for t in range(6, 11):
            step = hf(ids[:, t:t + 1], past_key_values=step.past_key_values, use_cache=True)
            logits.append(step.logits)
        torch.testing.assert_close(torch.cat(logits, 1), full, rtol=0, atol=1e-5)
        loss = hf(ids, labels=ids).loss  # transformers convention: labels shifted inside
        torch.testing.assert_close(loss, model(ids[:, :-1], labels=ids[:, 1:]).lm_loss, rtol=0, atol=1e-5)
        beams = [hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3,
                             do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("the lazy dog")["input_ids"]) == "the lazy dog"


def test_tensors_are_written_while_streaming(exported: tuple[EngramMoEModel, Path], tokenizer_dir: Path,
                                            tmp_path: Path) -> None:
    """Shards reach the disk while the iterator is still being consumed (bounded memory)."""
    model, _ = exported
    shards_seen: list[int] = []

    def stream():  # noqa: ANN202
        for name, tensor in model_tensors(model):
            shards_seen.append(len(list(tmp_path.glob(".out.tmp-*/.shard-*.safetensors"))))
            yield name, tensor.clone()  # as a checkpoint reader would: a fresh tensor per item

    addressing = build_addressing(model.config, _cmap(tokenizer_dir))
    export_tensors(stream(), model.config, addressing, tokenizer_dir, tokenizer_dir / "compression.npz",
                   tmp_path / "out", max_shard_size="40KB")
    assert shards_seen[0] == 0 and shards_seen[-1] >= 3
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= shards_seen[-1]


def test_export_errors_leave_nothing_behind(exported: tuple[EngramMoEModel, Path], tokenizer_dir: Path,
                                            tmp_path: Path) -> None:
    model, _ = exported
    addressing = build_addressing(model.config, _cmap(tokenizer_dir))
    missing = (kv for kv in model_tensors(model) if not kv[0].endswith("table.weight"))
    with pytest.raises(ValueError, match="were not given"):
        export_tensors(missing, model.config, addressing, tokenizer_dir, tokenizer_dir / "compression.npz",
                       tmp_path / "a")
    wrong = ((k, v[:1] if k == "embed.weight" else v) for k, v in model_tensors(model))
    with pytest.raises(ValueError, match="shape"):
        export_tensors(wrong, model.config, addressing, tokenizer_dir, tokenizer_dir / "compression.npz",
                       tmp_path / "b")
    cmap = _cmap(tokenizer_dir)
    other = CompressionMap(lookup=cmap.lookup, compressed_vocab_size=cmap.compressed_vocab_size,
                           vocab_size=cmap.vocab_size, tokenizer_fingerprint="another tokenizer")
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="different tokenizer"):
        export_model(model, addressing, tokenizer_dir, tmp_path / "other.npz", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.npz"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        export_model(model, addressing, tokenizer_dir, tokenizer_dir / "compression.npz", tmp_path / "d")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="parse"):
        parse_size("lots")


def _bpe_tokenizer_json(vocab_size: int, out: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT * 5 + [" ".join(map(str, range(2000)))], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out))


@pytest.mark.parametrize("case", ["missing_shard", "truncated_shard", "garbage_shard", "other_model_type",
                                  "bigger_tokenizer", "smaller_tokenizer"])
def test_broken_export_folders_name_the_file(exported: tuple[EngramMoEModel, Path], tmp_path: Path,
                                             case: str) -> None:
    import shutil

    from engram_pretrain.cli import main

    _, src = exported
    folder = tmp_path / case
    shutil.copytree(src, folder)
    shard = folder / sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())
                                ["weight_map"].values()))[1]
    if case == "missing_shard":
        shard.unlink()
        culprit, why = shard.name, "missing"
    elif case == "truncated_shard":
        os.truncate(shard, shard.stat().st_size - 10)
        culprit, why = shard.name, "truncated"
    elif case == "garbage_shard":
        shard.write_bytes(b"\xff" * 64)
        culprit, why = shard.name, "corrupt"
    elif case == "other_model_type":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
        culprit, why = "config.json", "model_type is 'llama'"
    else:
        _bpe_tokenizer_json(600 if case == "bigger_tokenizer" else 280, folder / "tokenizer.json")
        culprit = "tokenizer.json"
        why = "the model's vocab_size" if case == "bigger_tokenizer" else "engram_compression_map.npz"
    pattern = f"{folder / culprit}: .*{why}"
    with pytest.raises(ValueError, match=pattern):  # transformers' loader, through the shipped code
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=pattern):
        import_hf(folder)
    assert main(["check-export", str(folder)]) == 2


def test_bf16_load_keeps_mixing_and_router_weights_fp32(exported: tuple[EngramMoEModel, Path]) -> None:
    """`from_pretrained(dtype=torch.bfloat16)`: mHC, head-collapse and router weights stay fp32 (they are
    tiny and steer every token), the rest is bf16; logits stay close to fp32 and generation runs."""
    model, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    kept = {n: p.dtype for n, p in hf.named_parameters()
            if any(k in n for k in (".attn_hc.", ".ffn_hc.", "head_collapse.", ".router."))}
    assert kept and set(kept.values()) == {torch.float32}, kept
    assert hf.model.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size - 4, (2, 10))
    with torch.no_grad():
        logits = hf(ids).logits.float()
        want = model(ids).logits
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert (logits - want).abs().max() < 0.1 * want.abs().max()
    assert gen.shape == (2, 14)
