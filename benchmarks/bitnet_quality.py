"""BitNet b1.58 students on real text: held-out perplexity with and without distillation, sizes on disk, CPU decoding.

Data and tokenizer as in `benchmarks/cache_quality.py` (whose functions this script imports):
`/work/shared/data/tinyshakespeare.txt` (override with `--data`), first 90 % of the characters for training, last
10 % held out; a byte-level BPE tokenizer with `--vocab` tokens trained on the train split; non-overlapping rows of
`--seq-len` tokens.

Models: Llama-style (`LlamaConfig`), float32, untied embeddings. The teacher (default 4 layers x 256) is trained from
scratch with plain `trl.SFTTrainer` on the train rows. Every student (default 2 layers x 256, intermediate 768, so
that every ternary row is a multiple of 256 as GGUF's TQ types need) starts from the same random initialisation and
trains for the same `--student-steps` over one epoch of the same seeded subset of train rows, with the same batch
size, cosine learning-rate schedule and data order. Variants (`--variants`):

- `fp_kd`: full-precision student, `DistillationTrainer` (forward KL, temperature 1, `alpha=--alpha`);
- `ternary_kd_warmup`: the same with `BitNetCallback(schedule="linear", warmup_steps=--warmup-fraction * steps)`
  (lambda from 0 to 1 over the first half of the steps by default; weights and activations alike);
- `ternary_kd_nowarmup`: the same with `BitNetCallback(schedule="constant")` (lambda 1 from the first step);
- `ternary_sft_warmup`, `ternary_sft_nowarmup`: `trl.SFTTrainer` on the labels (no teacher), same callbacks;
- `fp_sft`: the full-precision student with `SFTTrainer`, a reference.

The learning rate is `--fp-lr` for the fp students and `--ternary-lr` for all the ternary ones. Ternary students are
evaluated at lambda = 1 (ternary weights, 8-bit activations: what the exports store). Metric: held-out perplexity
(`exp` of the mean next-token cross-entropy over the held-out rows), relative to `fp_kd`; the issue's target is
ternary + KD within 15 % of the fp student.

Then the best ternary KD student is exported: a dequantized twin (`nn.Linear` with the ternary weights `codes * alpha`,
no activation quantization) saved with `save_pretrained` in float32 and bfloat16; the packed 1.58-bit safetensors of
`hf_distill.export.export_packed` (stock `from_pretrained` loads it with transformers' packed `BitLinear`); GGUF files
of `hf_distill.export.export_gguf` in TQ2_0 and TQ1_0 (and a float one of the twin if the exporter writes one). Sizes
on disk and bits per ternary weight are reported; the packed model's perplexity is evaluated through stock
transformers as a check of the export. CPU decoding: greedy generation of `--new-tokens` tokens from a
`--prompt-tokens` prompt (the start of a held-out row), tokens/s = new tokens / wall time of the whole call (prefill
included), median of `--decode-rounds` rounds taken in turns, `--decode-threads` threads for torch and llama.cpp.
The trained student is tiny, so its decoding is bound by per-token overhead; the same exports and timings are then
repeated on a larger random-init ternary Llama (`--speed-layers` x `--speed-hidden`, default 8 x 512; speed and size
do not depend on the weight values).

Usage:
    python benchmarks/bitnet_quality.py            # full run (~27 min on 2 shared CPU cores at load 2-5)
    python benchmarks/bitnet_quality.py --quick    # smoke run (< 2 min): tiny data and models, docs untouched
    python benchmarks/bitnet_quality.py --variants fp_kd,ternary_kd_warmup --no-write --json /tmp/bq.json
    # keep the trained student, then redo only the exports and timings (and table a second run's --json):
    python benchmarks/bitnet_quality.py --work-dir /tmp/bq
    python benchmarks/bitnet_quality.py --work-dir /tmp/bq --reuse --extra-run /tmp/bq_alpha.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402
from cache_quality import (  # noqa: E402
    add_data_arguments,
    add_run_arguments,
    config_kwargs,
    dir_bytes,
    evaluate,
    last_logged_loss,
    n_params,
    prepare_data,
    train_quietly,
)

SECTION = "bitnet_quality"
VARIANTS = (
    "fp_kd",
    "ternary_kd_warmup",
    "ternary_kd_nowarmup",
    "ternary_sft_warmup",
    "ternary_sft_nowarmup",
    "fp_sft",
)
TARGET = 0.15
"""The issue's target: ternary + KD within 15 % of the fp student's perplexity."""


def is_ternary(variant: str) -> bool:
    return variant.startswith("ternary")


def is_kd(variant: str) -> bool:
    return "_kd" in variant


# Models -------------------------------------------------------------------------------------------------------------


def build_llama(args, role: str, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers = getattr(args, f"{role}_hidden"), getattr(args, f"{role}_layers")
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=getattr(args, f"{role}_intermediate"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def dequantized_twin(model):
    """A plain full-precision copy of a BitLinear model: every `BitLinear` becomes an `nn.Linear` holding its ternary
    weight `codes * alpha` (same weights as the exports; the activations are no longer quantized)."""
    import torch
    from torch import nn

    from hf_distill.bitnet import bitlinear_layers

    twin = copy.deepcopy(model)
    for name, layer in bitlinear_layers(twin).items():
        codes, alpha = layer.ternary_weight()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_((codes.float() * alpha).to(layer.weight.dtype))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        twin.set_submodule(name, linear)
    if getattr(twin.config, "quantization_config", None) is not None:
        del twin.config.quantization_config
    if hasattr(twin.config, "bitnet_sub_norm"):
        del twin.config.bitnet_sub_norm
    return twin.eval()


# Sizes --------------------------------------------------------------------------------------------------------------


def safetensors_tensor_bytes(folder: Path) -> dict[str, tuple[str, list[int], int]]:
    """`{name: (dtype, shape, bytes)}` of every tensor in the safetensors files of `folder` (headers only)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                tensors[name] = (info["dtype"], info["shape"], end - start)
    return tensors


def packed_bits_per_weight(folder: Path, ternary_layers: dict[str, int]) -> float:
    """Bits per ternary weight of a packed export: bytes of the ternary layers' tensors (codes and scales) over their
    weight count."""
    tensors = safetensors_tensor_bytes(folder)
    total = 0
    for name, (_, _, nbytes) in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module in ternary_layers:
            total += nbytes
    return 8 * total / sum(ternary_layers.values())


def gguf_summary(path: Path) -> dict:
    """Tensor types of a GGUF file and the bits per weight of its ternary (TQ*) tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types: dict[str, int] = {}
    tq_bytes = tq_elements = 0
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        if kind.startswith("TQ"):
            tq_bytes += int(tensor.n_bytes)
            tq_elements += int(tensor.n_elements)
    return {
        "bytes": path.stat().st_size,
        "tensor_types": types,
        "ternary_bits_per_weight": 8 * tq_bytes / tq_elements if tq_elements else None,
    }


# Decoding speed -----------------------------------------------------------------------------------------------------


def hf_decoder(model, prompt: list[int], new_tokens: int, pad_token_id: int):
    import torch

    ids = torch.tensor([prompt])

    def decode() -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
            )
        return out[0, len(prompt) :].tolist()

    return decode


def llama_cpp_decoder(path: Path, prompt: list[int], new_tokens: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=max(256, len(prompt) + new_tokens + 8),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=max(64, len(prompt)),
        logits_all=False,
        verbose=False,
    )

    def decode() -> list[int]:
        generated = []
        llm.reset()  # otherwise generate() reuses the cached prompt prefix of the previous call and skips prefill
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            generated.append(int(token))
            if len(generated) == new_tokens:
                break
        return generated

    decode.llm = llm
    return decode


def time_decoders(decoders: dict, rounds: int) -> dict:
    """Each decoder once untimed (compilation, caches), then `rounds` timed calls taken in turns."""
    results = {name: {"times": [], "tokens": None} for name in decoders}
    for name, decode in decoders.items():
        start = time.perf_counter()
        results[name]["tokens"] = decode()
        results[name]["first_call_s"] = time.perf_counter() - start
        print(f"  {name}: first call {results[name]['first_call_s']:.1f} s", flush=True)
    names = list(decoders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            decoders[name]()
            results[name]["times"].append(time.perf_counter() - start)
    for name, result in results.items():
        result["median_s"] = common.median(result["times"])
        result["tokens_per_s"] = len(result["tokens"]) / result["median_s"]
        print(f"  {name}: {result['tokens_per_s']:.1f} tokens/s (median {result['median_s']:.3f} s)", flush=True)
    return results


# Run ----------------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from hf_distill import BitNetCallback, DistillationConfig, DistillationTrainer
    from hf_distill.bitnet import bitlinear_layers, set_bitnet_lambda

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="hf_distill_bitnet_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"variants": {}, "sizes": {}, "decode": {}, "notes": []}

    # Data and tokenizer (as in cache_quality.py)
    tokenizer, train_rows, eval_rows, student_rows, out["data"] = prepare_data(args)
    train_ds = Dataset.from_dict({"input_ids": train_rows})
    student_ds = Dataset.from_dict({"input_ids": student_rows})
    print(f"Data: {json.dumps(out['data'])}", flush=True)

    if args.reuse:
        from hf_distill.bitnet import load_bitnet_student

        saved = json.loads((work / "results.json").read_text())
        out.update({k: v for k, v in saved.items() if k in ("teacher", "variants")})
        full = work / "results_full.json"  # the whole earlier run, when it finished
        previous = json.loads(full.read_text()) if full.exists() else {}
        out["previous_wall_s"], out["previous_command"] = previous.get("wall_s"), previous.get("command")
        best = min((v for v in out["variants"] if is_ternary(v) and is_kd(v)), key=lambda v: out["variants"][v]["ppl"])
        model = load_bitnet_student(work / "qat").eval()
        print(f"Reusing {work}: results of {list(out['variants'])}, exporting {best}", flush=True)
        export_and_decode(args, out, {best: model}, tokenizer, eval_rows, work, AutoModelForCausalLM)
        return out

    # Teacher: plain SFT from scratch on all the train rows
    set_seed(args.seed)
    teacher = build_llama(args, "teacher", tokenizer)
    teacher_trainer = SFTTrainer(
        model=teacher,
        args=SFTConfig(**config_kwargs(args, str(work / "teacher"), args.teacher_steps, args.teacher_lr)),
        train_dataset=train_ds,
        processing_class=tokenizer,
    )
    wall = train_quietly(teacher_trainer)
    teacher = teacher_trainer.model.eval()
    out["teacher"] = {
        "params": n_params(teacher),
        "train_s": wall,
        "s_per_step": wall / args.teacher_steps,
        "final_train_loss": last_logged_loss(teacher_trainer),
        **evaluate(teacher, eval_rows, args.eval_batch_size),
    }
    print(
        f"Teacher: held-out ppl {out['teacher']['ppl']:.3f} (unigram {out['data']['unigram_ppl']:.1f}), "
        f"final train loss {out['teacher']['final_train_loss']:.3f}, {wall:.0f} s for {args.teacher_steps} steps",
        flush=True,
    )
    del teacher_trainer

    warmup_steps = max(1, round(args.warmup_fraction * args.student_steps))

    def callbacks(variant: str) -> list:
        if not is_ternary(variant):
            return []
        if variant.endswith("_nowarmup"):
            return [BitNetCallback(schedule="constant", constant_lambda=1.0, sub_norm=args.sub_norm)]
        return [BitNetCallback(schedule="linear", warmup_steps=warmup_steps, sub_norm=args.sub_norm)]

    # Students: same init, same rows, same order; only the trainer, the callback and the lr differ
    models = {}
    for variant in args.variants:
        set_seed(args.seed)
        student = build_llama(args, "student", tokenizer)
        lr = args.ternary_lr if is_ternary(variant) else args.fp_lr
        kwargs = config_kwargs(args, str(work / variant), args.student_steps, lr)
        if is_kd(variant):
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                teacher_processing_class=tokenizer,
                args=DistillationConfig(**kwargs, divergence=args.divergence, temperature=1.0, alpha=args.alpha),
                train_dataset=student_ds,
                processing_class=tokenizer,
                callbacks=callbacks(variant),
            )
        else:
            trainer = SFTTrainer(
                model=student,
                args=SFTConfig(**kwargs),
                train_dataset=student_ds,
                processing_class=tokenizer,
                callbacks=callbacks(variant),
            )
        wall = train_quietly(trainer)
        model = trainer.model.eval()
        ternary = bitlinear_layers(model)
        if ternary:
            set_bitnet_lambda(model, 1.0)  # what the exports store
        result = evaluate(model, eval_rows, args.eval_batch_size)
        out["variants"][variant] = {
            "params": n_params(model),
            "lr": lr,
            "ternary_layers": len(ternary),
            "train_s": wall,
            "s_per_step": wall / args.student_steps,
            "final_train_loss": last_logged_loss(trainer),
            **result,
        }
        print(
            f"Student {variant}: held-out ppl {result['ppl']:.3f}, {wall:.0f} s ({wall / args.student_steps:.3f} "
            f"s/step), last logged train loss {out['variants'][variant]['final_train_loss']:.4f}",
            flush=True,
        )
        if ternary and is_kd(variant):
            models[variant] = model
        del trainer
    del teacher

    if models:
        best = min(models, key=lambda v: out["variants"][v]["ppl"])
        models = {best: models[best]}
        if args.work_dir:  # for --reuse: the exported model as a QAT checkpoint, and the results so far
            models[best].save_pretrained(work / "qat")
            tokenizer.save_pretrained(work / "qat")
            (work / "results.json").write_text(json.dumps(out, default=str))
    if not args.skip_export and models:
        export_and_decode(args, out, models, tokenizer, eval_rows, work, AutoModelForCausalLM)

    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out


def export_formats(args, model, tokenizer, folder: Path, notes: list[str]) -> tuple[dict, dict, object]:
    """Write the twin (fp32, bf16), the packed export and the GGUF files of `model` under `folder`.

    Returns `(sizes, paths, twin)`: sizes by format label, `paths` with `twin_fp32`, `twin_bf16`, `packed` (or None)
    and `gguf` (`{kind: path}`), and the fp32 dequantized twin."""
    import torch

    from hf_distill.bitnet import bitlinear_layers

    folder.mkdir(parents=True, exist_ok=True)
    ternary_layers = {name: layer.weight.numel() for name, layer in bitlinear_layers(model).items()}
    sizes: dict = {}
    paths: dict = {"twin_fp32": folder / "twin_fp32", "twin_bf16": folder / "twin_bf16", "packed": None, "gguf": {}}

    def weight_bytes(path: Path) -> int:  # tokenizer files are not counted
        return dir_bytes(path) - sum(f.stat().st_size for f in path.glob("*token*"))

    twin = dequantized_twin(model)
    twin.save_pretrained(paths["twin_fp32"])
    copy.deepcopy(twin).to(torch.bfloat16).save_pretrained(paths["twin_bf16"])
    sizes["fp32 (save_pretrained)"] = {"bytes": weight_bytes(paths["twin_fp32"]), "bits_per_weight": 32.0}
    sizes["bf16 (save_pretrained)"] = {"bytes": weight_bytes(paths["twin_bf16"]), "bits_per_weight": 16.0}
    try:
        from hf_distill.export import export_packed

        packed_dir = folder / "packed"
        shutil.rmtree(packed_dir, ignore_errors=True)
        start = time.perf_counter()
        export_packed(model, str(packed_dir), tokenizer=tokenizer, linear_class="bitlinear")
        sizes["packed 1.58-bit (export_packed, bf16)"] = {
            "bytes": weight_bytes(packed_dir),
            "bits_per_weight": packed_bits_per_weight(packed_dir, ternary_layers),
            "export_s": time.perf_counter() - start,
        }
        paths["packed"] = packed_dir
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the benchmark goes on
        notes.append(f"export_packed failed: {type(exc).__name__}: {exc}")
        print(notes[-1], flush=True)
    for kind in ["TQ2_0", "TQ1_0"] + (["F16"] if args.gguf_f16 else []):
        try:
            path = folder / f"model-{kind}.gguf"
            start = time.perf_counter()
            write_gguf(model, path, tokenizer, kind)
            summary = gguf_summary(path)
            summary["export_s"] = time.perf_counter() - start
            if kind == "F16":
                summary["ternary_bits_per_weight"] = 16.0
            label = f"GGUF {kind}" if kind.startswith("TQ") else f"GGUF {kind} (same ternary values)"
            sizes[label] = {**summary, "bits_per_weight": summary["ternary_bits_per_weight"]}
            paths["gguf"][kind] = path
        except Exception as exc:  # noqa: BLE001
            notes.append(f"GGUF export {kind} failed: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
    for name, size in sizes.items():
        print(f"Size {name}: {size['bytes']} bytes, {size.get('bits_per_weight')} bits/weight", flush=True)
    return sizes, paths, twin


def decode_all(args, paths: dict, packed, prompt: list[int], pad: int, auto_cls, notes: list[str]) -> dict:
    """Load every format, time greedy decoding in turns, and compare the generated tokens with the packed model's."""
    import torch

    torch.set_num_threads(args.decode_threads)
    decoders = {
        "transformers fp32 twin": hf_decoder(
            auto_cls.from_pretrained(paths["twin_fp32"]).eval(), prompt, args.new_tokens, pad
        ),
        "transformers bf16 twin": hf_decoder(
            auto_cls.from_pretrained(paths["twin_bf16"], dtype=torch.bfloat16).eval(), prompt, args.new_tokens, pad
        ),
    }
    if packed is not None:
        decoders["transformers packed 1.58-bit"] = hf_decoder(packed, prompt, args.new_tokens, pad)
    try:
        import llama_cpp  # noqa: F401

        for kind, path in paths["gguf"].items():
            try:
                decoders[f"llama.cpp GGUF {kind}"] = llama_cpp_decoder(
                    path, prompt, args.new_tokens, args.decode_threads
                )
            except Exception as exc:  # noqa: BLE001
                notes.append(f"llama.cpp could not load the {kind} GGUF: {type(exc).__name__}: {exc}")
                print(notes[-1], flush=True)
    except ImportError:
        if "llama_cpp is not installed: no llama.cpp timings." not in notes:
            notes.append("llama_cpp is not installed: no llama.cpp timings.")
        print(notes[-1], flush=True)
    print(f"Decoding {args.new_tokens} tokens from a {len(prompt)}-token prompt, {args.decode_threads} thread(s):")
    decode = time_decoders(decoders, args.decode_rounds)
    ref = "transformers packed 1.58-bit" if "transformers packed 1.58-bit" in decode else "transformers fp32 twin"
    for result in decode.values():
        same = sum(a == b for a, b in zip(result["tokens"], decode[ref]["tokens"]))
        result["agreement"] = same / max(1, len(decode[ref]["tokens"]))
    return {"decoders": decode, "reference": ref}


def load_packed(paths: dict, auto_cls, notes: list[str]):
    if paths["packed"] is None:
        return None
    try:
        return auto_cls.from_pretrained(paths["packed"]).eval()
    except Exception as exc:  # noqa: BLE001
        notes.append(f"loading the packed export with from_pretrained failed: {type(exc).__name__}: {exc}")
        print(notes[-1], flush=True)
        return None


def export_and_decode(args, out, models, tokenizer, eval_rows, work: Path, auto_cls) -> None:
    from hf_distill.bitnet import bitlinear_layers

    variant = min(models, key=lambda v: out["variants"][v]["ppl"])
    model = models[variant]
    out["exported_variant"] = variant
    out["ternary_weights"] = sum(layer.weight.numel() for layer in bitlinear_layers(model).values())
    print(f"Exporting {variant}: {out['ternary_weights']} ternary weights of {n_params(model)} parameters", flush=True)
    out["sizes"], paths, twin = export_formats(args, model, tokenizer, work, out["notes"])
    out["twin_ppl"] = evaluate(twin, eval_rows, args.eval_batch_size)["ppl"]
    print(f"Dequantized twin (fp activations): held-out ppl {out['twin_ppl']:.3f}", flush=True)
    packed = load_packed(paths, auto_cls, out["notes"])
    if packed is not None:  # the packed export through stock transformers: same perplexity as the QAT model?
        out["packed_dtype"] = str(next(packed.parameters()).dtype)
        start = time.perf_counter()
        rows = eval_rows[: args.packed_eval_rows]
        out["packed_check"] = {
            "rows": len(rows),
            "packed_ppl": evaluate(packed, rows, args.eval_batch_size)["ppl"],
            "qat_ppl": evaluate(model, rows, args.eval_batch_size)["ppl"],
            "eval_s": time.perf_counter() - start,
        }
        print(f"Packed export check: {json.dumps(out['packed_check'])}", flush=True)
    prompt = eval_rows[0][: args.prompt_tokens]
    result = decode_all(args, paths, packed, prompt, tokenizer.pad_token_id, auto_cls, out["notes"])
    out["decode"], out["decode_reference"] = result["decoders"], result["reference"]
    if args.speed_layers:
        speed_model(args, out, tokenizer, prompt, work / "speed", auto_cls)


def speed_model(args, out, tokenizer, prompt, folder: Path, auto_cls) -> None:
    """Sizes and decoding speed of a larger random-init ternary Llama (speed does not depend on the weights)."""
    from transformers import set_seed

    from hf_distill.bitnet import convert_to_bitnet, set_bitnet_lambda

    spec = argparse.Namespace(
        speed_hidden=args.speed_hidden,
        speed_intermediate=args.speed_intermediate,
        speed_layers=args.speed_layers,
        seq_len=args.seq_len,
    )
    set_seed(args.seed)
    model = build_llama(spec, "speed", tokenizer).eval()
    conversion = convert_to_bitnet(model)
    set_bitnet_lambda(model, 1.0)
    info = {
        "params": n_params(model),
        "ternary_weights": sum(model.get_submodule(n).weight.numel() for n in conversion.converted),
        "notes": [],
    }
    print(f"Speed model: {json.dumps({k: v for k, v in info.items() if k != 'notes'})}", flush=True)
    info["sizes"], paths, twin = export_formats(args, model, tokenizer, folder, info["notes"])
    del twin
    packed = load_packed(paths, auto_cls, info["notes"])
    rounds = argparse.Namespace(**{**vars(args), "decode_rounds": min(args.decode_rounds, args.speed_rounds)})
    result = decode_all(rounds, paths, packed, prompt, tokenizer.pad_token_id, auto_cls, info["notes"])
    info["decode"], info["decode_reference"] = result["decoders"], result["reference"]
    out["speed_model"] = info
    shutil.rmtree(folder, ignore_errors=True)


def write_gguf(model, path: Path, tokenizer, kind: str):
    """`export_gguf` with the ternary layers as `kind`: TQ2_0, TQ1_0, or F16 (the same values `codes * alpha`
    unpacked, the baseline)."""
    from hf_distill.export import export_gguf

    return export_gguf(model, str(path), tokenizer=tokenizer, ternary_type=kind, overwrite=True)


def _jsonable(value):
    try:
        return json.loads(json.dumps(value, default=lambda v: getattr(v, "__dict__", str(v))))
    except (TypeError, ValueError):
        return str(value)


# Report -------------------------------------------------------------------------------------------------------------

LABELS = {
    "fp_kd": "fp student, KD",
    "ternary_kd_warmup": "ternary, KD, lambda warm-up",
    "ternary_kd_nowarmup": "ternary, KD, no warm-up (lambda 1)",
    "ternary_sft_warmup": "ternary, SFT (labels), lambda warm-up",
    "ternary_sft_nowarmup": "ternary, SFT (labels), no warm-up",
    "fp_sft": "fp student, SFT (labels)",
}


def size_table(sizes: dict) -> str:
    fp32 = sizes.get("fp32 (save_pretrained)", {}).get("bytes")
    rows = []
    for name, s in sizes.items():
        bpw = s.get("bits_per_weight")
        rows.append(
            [
                name,
                f"{s['bytes'] / 2**20:.2f}",
                f"{fp32 / s['bytes']:.1f}x" if fp32 else "",
                f"{bpw:.2f}" if isinstance(bpw, float) else "",
            ]
        )
    return common.markdown_table(
        ["format", "on disk (MiB, weights + config)", "fp32 / this", "bits per ternary-layer weight"], rows
    )


def decode_table(decode: dict, reference: str | None) -> str:
    fp32_speed = decode.get("transformers fp32 twin", {}).get("tokens_per_s")
    rows = [
        [
            name,
            f"{d['tokens_per_s']:.1f}",
            f"{d['tokens_per_s'] / fp32_speed:.2f}" if fp32_speed else "",
            f"{d['first_call_s']:.1f}",
            f"{100 * d['agreement']:.0f} %",
        ]
        for name, d in decode.items()
    ]
    return common.markdown_table(
        ["decoder", "tokens/s", "vs fp32 twin", "first call (s)", f"agreement with {reference}"], rows
    )


def wall_line(out: dict, wall: float) -> str:
    if "previous_wall_s" not in out:
        return f"Total benchmark wall time {wall:.0f} s."
    previous = out["previous_wall_s"]
    trained = f"{previous:.0f} s" if previous else "not recorded"
    command = f" (`{out['previous_command']}`)" if out.get("previous_command") else ""
    return (
        f"Wall time: training run{command} {trained} in all (data, teacher, students, exports of the trained "
        f"student, decoding), then the `--reuse` run below (exports and decoding again, the larger speed model) "
        f"{wall:.0f} s."
    )


def observations(args, out: dict) -> list[str]:
    """Data-driven remarks on the perplexity table (only those the numbers support)."""
    v, teacher = out["variants"], out["teacher"]["ppl"]
    lines = []
    kd = [name for name in v if is_kd(name)]
    sft = [name for name in v if not is_kd(name)]
    if kd and sft and min(v[n]["ppl"] for n in sft) < min(v[n]["ppl"] for n in kd):
        best_kd = min(kd, key=lambda n: v[n]["ppl"])
        best_sft = min(sft, key=lambda n: v[n]["ppl"])
        lines.append(
            f"- The teacher is the ceiling here, not the ternary weights: the KD students end near the teacher's "
            f"perplexity ({teacher:.2f}; best KD student `{best_kd}` {v[best_kd]['ppl']:.2f}) while the best "
            f"label-trained student (`{best_sft}`, {v[best_sft]['ppl']:.2f}) fits the labels directly and passes "
            f"it. With a teacher this close to the student ({args.teacher_layers} vs {args.student_layers} layers "
            f"of the same width, {args.teacher_steps} steps on CPU) and `alpha={args.alpha:g}`, distillation "
            "mostly transfers the teacher's errors; the 15 % target compares ternary with fp under the same "
            "teacher, which is what it isolates."
        )
    lines.append(
        "- One seed and one run per variant, no error bars: differences of a few percent between variants may not "
        "survive another seed."
    )
    return lines


def extra_run_blocks(args, out: dict) -> list[str]:
    """A table of a second run (`--extra-run`, its `--json`) next to this one: same setup unless its command says."""
    extra = json.loads(Path(args.extra_run).read_text())
    ev, ea = extra["variants"], extra.get("args", {})
    fp = ev.get("fp_kd")
    rows = []
    for name, r in ev.items():
        here = out["variants"].get(name)
        rows.append(
            [
                f"`{name}`",
                f"{ea.get('alpha', '')}",
                f"{r['ppl']:.2f}",
                f"{100 * (r['ppl'] / fp['ppl'] - 1):+.1f} %" if fp is not None and name != "fp_kd" else "",
                f"{here['ppl']:.2f}" if here else "",
            ]
        )
    text = (
        f"Second run, KD with the label cross-entropy mixed in (`{extra.get('command', '')}`; same data, teacher "
        f"recipe, initialisation, steps and lr; teacher ppl {extra['teacher']['ppl']:.2f}, wall time "
        f"{extra.get('wall_s', float('nan')):.0f} s):"
    )
    table = common.markdown_table(
        ["student", "alpha", "held-out ppl", "vs its fp_kd", "same variant above (alpha " + f"{args.alpha:g})"], rows
    )
    lines = []
    for name in ("ternary_kd_warmup", "ternary_kd_nowarmup"):
        if name in ev and fp is not None:
            rel = ev[name]["ppl"] / fp["ppl"] - 1
            lines.append(
                f"- Target with alpha {ea.get('alpha')}, `{name}`: {100 * rel:+.1f} % "
                f"({'meets' if rel <= TARGET else 'misses'})."
            )
    here = out["variants"]
    for kd, sft in (("fp_kd", ("fp_sft",)), ("ternary_kd_warmup", ("ternary_sft_warmup", "ternary_sft_nowarmup"))):
        labels = [n for n in sft if n in here]
        if kd in ev and labels:
            best = min(labels, key=lambda n: here[n]["ppl"])
            rel = ev[kd]["ppl"] / here[best]["ppl"] - 1
            lines.append(
                f"- `{kd}` with alpha {ea.get('alpha')} vs the best label-only student of the same precision above "
                f"(`{best}`, {here[best]['ppl']:.2f}): {ev[kd]['ppl']:.2f} ({100 * rel:+.1f} %)."
            )
    return [text, table, "\n".join(lines)] if lines else [text, table]


def speed_remarks(decode: dict, small: bool) -> str:
    def tps(name):
        return decode.get(name, {}).get("tokens_per_s")

    parts = []
    packed, fp32, bf16 = (
        tps("transformers packed 1.58-bit"),
        tps("transformers fp32 twin"),
        tps("transformers bf16 twin"),
    )
    if packed and fp32:
        parts.append(
            f"transformers' packed `BitLinear` decodes at {packed / fp32:.2f}x the fp32 twin"
            + (f" ({packed / bf16:.2f}x the bf16 one)" if bf16 else "")
            + ": it unpacks the 2-bit codes to a full bf16 matrix in every forward, so it saves disk and memory "
            "(the resident weights), not time"
        )
    tq2, tq1, f16 = tps("llama.cpp GGUF TQ2_0"), tps("llama.cpp GGUF TQ1_0"), tps("llama.cpp GGUF F16")
    if f16 and (tq2 or tq1):
        parts.append(
            "llama.cpp runs "
            + ", ".join(f"{k} at {v / f16:.2f}x" for k, v in (("TQ2_0", tq2), ("TQ1_0", tq1)) if v)
            + " its F16 GGUF"
            + (f" and {f16 / fp32:.1f}x the transformers fp32 twin" if fp32 else "")
        )
    text = "; ".join(parts) + "." if parts else ""
    if small:
        text += (
            " At this size (a few MiB of weights, in cache) decoding is bound by per-token overhead, not by "
            "weight bandwidth: the larger model below shows the bandwidth effect better."
        )
    return text.strip()


def report(args, out: dict, machine: str, wall: float) -> str:
    data, teacher, variants = out["data"], out["teacher"], out["variants"]
    fp = variants.get("fp_kd")
    rows = [
        ["teacher (SFT)", f"{teacher['params'] / 1e6:.2f}", "", f"{teacher['ppl']:.2f}", "", "", ""],
        ["unigram (train-split frequencies)", "", "", f"{data['unigram_ppl']:.1f}", "", "", ""],
    ]
    for variant, r in variants.items():
        rel = f"{100 * (r['ppl'] / fp['ppl'] - 1):+.1f} %" if fp is not None and variant != "fp_kd" else ""
        rows.append(
            [
                f"`{variant}`: {LABELS[variant]}",
                f"{r['params'] / 1e6:.2f}",
                f"{r['lr']:g}",
                f"{r['ppl']:.2f}",
                rel,
                f"{r['final_train_loss']:.3f}",
                f"{r['s_per_step']:.2f}",
            ]
        )
    table = common.markdown_table(
        ["model", "params (M)", "lr", "held-out ppl", "vs fp_kd", "last train loss", "train s/step"], rows
    )
    lines = []
    if fp is not None:
        for variant in ("ternary_kd_warmup", "ternary_kd_nowarmup"):
            if variant in variants:
                rel = variants[variant]["ppl"] / fp["ppl"] - 1
                verdict = "meets" if rel <= TARGET else "misses"
                lines.append(
                    f"- Target (ternary + KD within {100 * TARGET:.0f} % of the fp student's perplexity), "
                    f"`{variant}`: {100 * rel:+.1f} % ({verdict})."
                )
    for a, b, what in (
        ("ternary_kd_warmup", "ternary_sft_warmup", "KD vs labels, ternary with warm-up"),
        ("ternary_kd_nowarmup", "ternary_sft_nowarmup", "KD vs labels, ternary without warm-up"),
        ("fp_kd", "fp_sft", "KD vs labels, fp"),
        ("ternary_kd_warmup", "ternary_kd_nowarmup", "warm-up vs none, KD"),
        ("ternary_sft_warmup", "ternary_sft_nowarmup", "warm-up vs none, SFT"),
    ):
        if a in variants and b in variants:
            lines.append(
                f"- {what}: {variants[a]['ppl']:.2f} vs {variants[b]['ppl']:.2f} "
                f"({100 * (variants[a]['ppl'] / variants[b]['ppl'] - 1):+.1f} %)."
            )

    lines += observations(args, out)
    blocks = []
    if args.extra_run:
        blocks += extra_run_blocks(args, out)
    if out.get("exported_variant"):
        exported = out["exported_variant"]
        check = out.get("packed_check")
        export_lines = [
            f"Exports of `{exported}` ({out['ternary_weights'] / 1e6:.2f} M ternary weights in "
            f"{out['variants'][exported]['ternary_layers']} layers; the embeddings, norms and `lm_head` "
            f"({(out['variants'][exported]['params'] - out['ternary_weights']) / 1e6:.2f} M parameters) stay in "
            "full precision in every format). The fp32/bf16 rows are the dequantized twin (`nn.Linear` holding "
            "`codes * alpha`, no activation quantization) saved with `save_pretrained`; the GGUF F16 row is the same "
            "export with the ternary layers stored as F16 (the exporter's F16 fallback forced), the llama.cpp "
            "baseline; tokenizer files are not counted; bits per weight over the ternary layers only.",
        ]
        if check:
            export_lines.append(
                f"Check of the packed export through stock `AutoModelForCausalLM.from_pretrained` "
                f"({out.get('packed_dtype')}): held-out ppl {check['packed_ppl']:.3f} vs {check['qat_ppl']:.3f} for "
                f"the trained model at lambda 1 (first {check['rows']} held-out rows). The dequantized twin without "
                f"activation quantization: {out['twin_ppl']:.3f} (all held-out rows)."
            )
        blocks += [" ".join(export_lines), size_table(out["sizes"])]
        if out.get("decode"):
            blocks.append(
                f"CPU decoding: greedy, {args.new_tokens} new tokens from a {args.prompt_tokens}-token prompt (start "
                f"of a held-out row), batch 1, {args.decode_threads} thread(s) (`torch.set_num_threads` and "
                f"llama.cpp `n_threads`); tokens/s = new tokens / wall time of the whole call (prefill included), "
                f"median of {args.decode_rounds} rounds taken in turns after one untimed call (the first call "
                f"includes `torch.compile` for the packed model); agreement = share of generated tokens equal to "
                f"those of {out.get('decode_reference')}. Trained student:"
            )
            blocks.append(decode_table(out["decode"], out.get("decode_reference")))
            blocks.append(speed_remarks(out["decode"], small=bool(out.get("speed_model"))))
    speed = out.get("speed_model")
    if speed:
        blocks.append(
            f"The same exports and decoding for a larger random-init ternary Llama (speed and size do not depend on "
            f"the weight values): {args.speed_layers} layers x {args.speed_hidden} (intermediate "
            f"{args.speed_intermediate}), {speed['params'] / 1e6:.1f} M parameters of which "
            f"{speed['ternary_weights'] / 1e6:.1f} M ternary, same tokenizer, prompt and settings (median of "
            f"{min(args.decode_rounds, args.speed_rounds)} rounds):"
        )
        blocks.append(size_table(speed["sizes"]))
        if speed.get("decode"):
            blocks.append(decode_table(speed["decode"], speed.get("decode_reference")))
            blocks.append(speed_remarks(speed["decode"], small=False))
    notes = out.get("notes", []) + (speed or {}).get("notes", [])
    if notes:
        blocks.append("\n".join(f"- Note: {n}" for n in notes))

    warm = max(1, round(args.warmup_fraction * args.student_steps))
    setup = (
        f"Data: `{os.path.basename(args.data)}`, first 90 % of the characters for training "
        f"({data['train_chars']} chars), last 10 % held out ({data['eval_chars']} chars); byte-level BPE tokenizer "
        f"with {data['vocab']} tokens trained on the train split; rows of {args.seq_len} tokens: "
        f"{data['train_rows']} train rows, {data['eval_rows']} held-out rows ({teacher['tokens']} scored next-token "
        f"predictions). Models: Llama-style, float32, untied embeddings. Teacher {args.teacher_layers} layers x "
        f"{args.teacher_hidden} (intermediate {args.teacher_intermediate}), trained from scratch with `SFTTrainer` "
        f"for {args.teacher_steps} steps (lr {args.teacher_lr:g}; final train loss {teacher['final_train_loss']:.3f}, "
        f"{teacher['s_per_step']:.2f} s/step). Students {args.student_layers} layers x {args.student_hidden} "
        f"(intermediate {args.student_intermediate}), same random initialisation, {args.student_steps} steps each "
        f"over one epoch of the same {data['student_rows']} rows (a seeded random subset of the train rows), same "
        f"data order; batch {args.batch_size} x {args.seq_len}, AdamW, cosine lr schedule with "
        f"{max(1, args.student_steps // 20)} warm-up steps, seed {args.seed}, CPU, {args.threads} torch thread(s). "
        f"Learning rate {args.fp_lr:g} for the fp students and {args.ternary_lr:g} for every ternary one. KD: "
        f"`DistillationTrainer(divergence={args.divergence!r}, temperature=1, alpha={args.alpha:g})` (`alpha` weighs "
        f"the label cross-entropy). Ternary: `BitNetCallback` (every linear layer but `lm_head`, 8-bit activations, "
        f"sub_norm={args.sub_norm}); warm-up = `schedule='linear'` over the first {warm} of the "
        f"{args.student_steps} steps (lambda 0 -> 1, weights and activations), no warm-up = `schedule='constant'` "
        f"(lambda 1 from step 0). Ternary students are evaluated at lambda 1 (ternary weights, 8-bit activations). "
        "Held-out perplexity = exp(mean next-token cross-entropy)."
    )
    body = [
        "## BitNet b1.58 students on tinyshakespeare: quality, size, CPU decoding (`benchmarks/bitnet_quality.py`)",
        "",
        setup,
        "",
        table,
        "",
        *lines,
    ]
    for block in blocks:
        body += ["", block]
    body += [
        "",
        f"Machine: {machine}. {wall_line(out, wall)} Timings on a shared machine are indicative only.",
        "",
        "Command:",
        "",
        "```bash",
        common.command_line(),
        "```",
    ]
    return "\n".join(body)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-intermediate", type=int, default=768)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-intermediate", type=int, default=768)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--fp-lr", type=float, default=3e-3, help="Learning rate of the fp students.")
    parser.add_argument("--ternary-lr", type=float, default=6e-3, help="Learning rate of every ternary student.")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.5, help="Lambda warm-up length as a fraction of the student steps."
    )
    parser.add_argument("--alpha", type=float, default=0.0, help="Weight of the label cross-entropy in KD.")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--sub-norm", action="store_true", help="BitNetCallback(sub_norm=True) for ternary students.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {VARIANTS}.")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-eval-rows", type=int, default=None, help="Evaluate on at most N held-out rows.")
    parser.add_argument("--packed-eval-rows", type=int, default=128, help="Held-out rows for the packed check.")
    parser.add_argument("--skip-export", action="store_true", help="Perplexities only: no exports, no decoding.")
    parser.add_argument(
        "--no-gguf-f16",
        dest="gguf_f16",
        action="store_false",
        help="Skip the F16 GGUF of the same weights (the llama.cpp baseline).",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="With --work-dir of an earlier run: skip training, reload its results.json and QAT checkpoint, redo the "
        "exports and the decoding timings, and report.",
    )
    parser.add_argument(
        "--speed-layers",
        type=int,
        default=None,
        help="Also time decoding on a larger random-init ternary Llama with this many layers (default 8; 0 with "
        "--quick; 0: skip).",
    )
    parser.add_argument("--speed-hidden", type=int, default=512)
    parser.add_argument("--speed-intermediate", type=int, default=1536)
    parser.add_argument(
        "--speed-rounds", type=int, default=3, help="Timed rounds on the larger model (its packed decoding is slow)."
    )
    parser.add_argument(
        "--extra-run",
        default=None,
        help="The --json of a second run at other settings (e.g. --alpha 0.5): its perplexities are tabled too.",
    )
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--decode-threads", type=int, default=1, help="Threads of torch and llama.cpp decoding.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads for training (default 1; 0: torch's choice)."
    )
    add_run_arguments(parser, SECTION, "the models and exports")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_chars = args.max_chars or 120_000
        args.vocab, args.seq_len, args.batch_size = 320, 64, 8
        args.teacher_hidden, args.teacher_intermediate, args.teacher_layers, args.teacher_steps = 64, 128, 2, 30
        args.student_layers, args.student_steps = 1, 8
        args.max_eval_rows = args.max_eval_rows or 32
        args.packed_eval_rows = min(args.packed_eval_rows, 16)
        args.new_tokens, args.decode_rounds = 16, 2
        args.speed_layers = 0 if args.speed_layers is None else args.speed_layers
    args.variants = common.parse_variants(args.variants, VARIANTS)
    if args.speed_layers is None:
        args.speed_layers = 8
    if args.reuse and not args.work_dir:
        parser.error("--reuse needs --work-dir (the folder of the earlier run).")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    common.quiet_transformers()
    wall_start = time.perf_counter()
    machine = common.machine_description("cpu", args.threads)
    print(f"Command: {common.command_line()}")
    print(f"Machine: {machine}", flush=True)
    out = run(args)
    wall = time.perf_counter() - wall_start
    out["wall_s"] = wall
    out["command"] = common.command_line()
    body = report(args, out, machine, wall)
    print()
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **out}, indent=1, default=str))
    if args.work_dir and not args.reuse:
        (Path(args.work_dir) / "results_full.json").write_text(json.dumps(out, default=str))
    common.maybe_update_docs(args, body)


if __name__ == "__main__":
    main()
