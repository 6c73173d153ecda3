"""Quality benchmark: a student distilled from a cached top-k teacher vs from the live teacher, on real text.

Data: `/work/shared/data/tinyshakespeare.txt` (override with `--data`), split by characters: the first 90 % trains
(the tokenizer, the teacher and every student), the last 10 % is held out. Tokenizer: a byte-level BPE with
`--vocab` tokens (default 1024) trained locally with `tokenizers` on the train split only, so that k = 16 and k = 64
are real truncations of the vocabulary (with a 65-character vocabulary k = 64 would keep almost everything). Both
splits are tokenised once and cut into non-overlapping rows of `--seq-len` tokens (the remainder is dropped); the
training set is a pre-tokenised `input_ids` dataset, so SFT trains on every token of every row (no prompt, no
padding, no EOS added).

Models: Qwen2-style configs built with `AutoModelForCausalLM.from_config`, float32, untied embeddings. The teacher
(default 4 layers x 256) is trained from scratch with plain `trl.SFTTrainer` for `--teacher-steps`. Every student
(default 2 layers x 128) starts from the same random initialisation (`set_seed(--seed)` before it is built) and trains
for the same `--student-steps`, with the same batch size, learning-rate schedule and data order (same trainer seed),
with `DistillationTrainer(divergence=--divergence, temperature=1, alpha=0)`: pure distillation, the labels are never
used. Variants (`--variants`):

- `live`: the live teacher model (full-vocabulary distribution at every step);
- `cache_k<k>_<bits>bit` (default: `cache_k64_8bit`, `cache_k16_8bit`, `cache_k256_8bit`, `cache_k64_32bit`):
  `DistillationConfig(teacher_cache=...)`, no teacher loaded, from a cache written by
  `DistillationTrainer.write_teacher_cache(root, k=<k>, logprob_bits=<bits>)` over the same training rows, with
  `sparse_targets=--sparse-targets` (default `bucket`: the teacher's top k plus one bucket for the rest);
- `cache_k<k>_<bits>bit_renorm`: the same with `sparse_targets="renormalize"` (not in the default list);
- `cache_k<k>_<bits>bit_tail<n>`: a cache whose `k` ids per position are the teacher's top `k - n` plus `n` draws
  from its tail (`write_teacher_cache(..., tail_samples=n)`, seed `--seed`): an unbiased estimate of the teacher's
  distribution, trained with forward KL (not in the default list);
- `sft`: the same student trained with plain `trl.SFTTrainer` on the labels (no teacher), a reference.

Metric: held-out perplexity, `exp(mean token cross-entropy)` over every next-token prediction inside the held-out
rows (the first token of each row is context only), for the teacher, each student and a unigram model (add-one
smoothed token frequencies of the train split). Each cached variant is compared with `live` as the relative
difference of perplexities, `ppl(cache) / ppl(live) - 1`; the issue's target is k = 64 within 1 %. Also reported: the
teacher's mean probability mass outside its top k on the held-out positions, each cache's size on disk (bytes per
kept logit from the manifest, bytes per scored token from the files), the time to write it and the time per training
step of every variant (a shared machine: timings are indicative; the load average is recorded).

Everything runs in one process (the teacher, the caches and the students are built in turn; every student is its own
model instance), in a temporary folder that is deleted at the end (`--work-dir` keeps it).

Usage:
    python benchmarks/cache_quality.py            # full run: 8-13 minutes on 2 shared CPU cores (load 1-5)
    python benchmarks/cache_quality.py --quick    # smoke run (< 1 min): tiny models and data, docs untouched
    python benchmarks/cache_quality.py --variants live,cache_k64_8bit,cache_k64_8bit_renorm --no-write
    python benchmarks/cache_quality.py --quick --variants live,cache_k320_32bit  # k = V: same perplexity as live
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

SECTION = "cache_quality"
DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"
DEFAULT_VARIANTS = ("live", "cache_k64_8bit", "cache_k16_8bit", "cache_k256_8bit", "cache_k64_32bit", "sft")
CACHE_VARIANT = re.compile(r"cache_k(\d+)_(4|8|16|32)bit(?:_tail(\d+))?(_renorm)?")
"""`cache_k<k>_<bits>bit[_tail<n>]` (sparse targets from `--sparse-targets`) or `..._renorm` (renormalize)."""


def cache_variant(variant: str) -> tuple[int, int, int, str | None] | None:
    """`(k, logprob_bits, tail_samples, sparse_targets or None: --sparse-targets)` of a cache variant, else `None`."""
    match = CACHE_VARIANT.fullmatch(variant)
    if match is None:
        return None
    tail = int(match.group(3) or 0)
    return int(match.group(1)), int(match.group(2)), tail, "renormalize" if match.group(4) else None


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


# Data ---------------------------------------------------------------------------------------------------------------


def split_text(path: str, max_chars: int | None) -> tuple[str, str]:
    text = Path(path).read_text(encoding="utf-8")
    if max_chars:
        text = text[:max_chars]
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def build_tokenizer(train_text: str, vocab_size: int, seq_len: int):
    """Byte-level BPE with `vocab_size` tokens (4 specials included), trained on the train split only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 10_000
    backend.train_from_iterator((train_text[i : i + chunk] for i in range(0, len(train_text), chunk)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max(512, seq_len),
        padding_side="right",
    )


def tokenize_rows(tokenizer, text: str, seq_len: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def unigram_perplexity(train_rows: list[list[int]], eval_rows: list[list[int]], vocab_size: int) -> float:
    """Held-out perplexity of add-one smoothed train-split token frequencies (same predicted positions as below)."""
    import collections

    counts = collections.Counter(t for row in train_rows for t in row)
    total = sum(counts.values()) + vocab_size
    nll = [-math.log((counts[t] + 1) / total) for row in eval_rows for t in row[1:]]
    return math.exp(sum(nll) / len(nll))


# Models and training -------------------------------------------------------------------------------------------------


def prepare_data(args) -> tuple:
    """Split the text, train the tokenizer, cut both splits into rows; the students' fixed random subset of rows.

    Returns:
        `tuple`: (tokenizer, train rows, held-out rows, student rows (`student_steps * batch_size` train rows drawn
        with `seed`, in order), a dict describing the data).
    """
    start = time.perf_counter()
    train_text, eval_text = split_text(args.data, args.max_chars)
    tokenizer = build_tokenizer(train_text, args.vocab, args.seq_len)
    train_rows = tokenize_rows(tokenizer, train_text, args.seq_len)
    eval_rows = tokenize_rows(tokenizer, eval_text, args.seq_len)
    if args.max_eval_rows:
        eval_rows = eval_rows[: args.max_eval_rows]
    n_student = min(len(train_rows), args.student_steps * args.batch_size)
    student_rows = [train_rows[i] for i in sorted(random.Random(args.seed).sample(range(len(train_rows)), n_student))]
    info = {
        "train_chars": len(train_text),
        "eval_chars": len(eval_text),
        "vocab": len(tokenizer),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "student_rows": n_student,
        "train_tokens": len(train_rows) * args.seq_len,
        "eval_tokens": len(eval_rows) * args.seq_len,
        "chars_per_token": len(train_text) / len(tokenizer(train_text, add_special_tokens=False)["input_ids"]),
        "unigram_ppl": unigram_perplexity(train_rows, eval_rows, len(tokenizer)),
        "prep_s": time.perf_counter() - start,
    }
    return tokenizer, train_rows, eval_rows, student_rows, info


def build_model(args, role: str, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers = getattr(args, f"{role}_hidden"), getattr(args, f"{role}_layers")
    heads = max(1, hidden // 64)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 8 * 8,
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


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def config_kwargs(args, output_dir: str, steps: int, lr: float) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        disable_tqdm=True,
        dataloader_pin_memory=False,
        dataloader_num_workers=0,
        max_length=args.seq_len,
        packing=False,
        seed=args.seed,
    )


def train_quietly(trainer) -> float:
    """`trainer.train()` without the per-log console lines; returns the wall time in seconds."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def last_logged_loss(trainer) -> float:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return float(losses[-1]) if losses else float("nan")


def evaluate(model, rows: list[list[int]], batch_size: int, ks: tuple[int, ...] = ()) -> dict:
    """Held-out perplexity (exp of the mean next-token cross-entropy); for `ks`, the mean mass outside the top k."""
    import torch

    model.eval()
    nll_sum, count = 0.0, 0
    outside = {k: 0.0 for k in ks}
    target_outside = {k: 0 for k in ks}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids = torch.tensor(rows[start : start + batch_size])
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            targets = ids[:, 1:]
            nll_sum += -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
            if ks:
                sorted_probs = log_probs.exp().sort(dim=-1, descending=True).values
                for k in ks:
                    outside[k] += (1.0 - sorted_probs[..., :k].sum(-1)).clamp(min=0).sum().item()
                # Rank of the true next token: how many tokens the model finds strictly more likely
                target_lp = log_probs.gather(-1, targets.unsqueeze(-1))
                rank = (log_probs > target_lp).sum(-1)
                for k in ks:
                    target_outside[k] += int((rank >= k).sum())
    result = {"nll": nll_sum / count, "ppl": math.exp(nll_sum / count), "tokens": count}
    result["outside_top_k"] = {k: v / count for k, v in outside.items()}
    result["target_outside_top_k"] = {k: v / count for k, v in target_outside.items()}
    return result


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args) -> dict:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from hf_distill import DistillationConfig, DistillationTrainer

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="hf_distill_cache_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"variants": {}, "caches": {}}

    # Data and tokenizer
    tokenizer, train_rows, eval_rows, student_rows, out["data"] = prepare_data(args)
    train_ds = Dataset.from_dict({"input_ids": train_rows})
    # The students see exactly one epoch of a fixed random subset: the caches cover those rows only
    student_ds = Dataset.from_dict({"input_ids": student_rows})
    print(f"Data: {json.dumps(out['data'])}", flush=True)
    ks = tuple(sorted({cache_variant(v)[0] for v in args.variants if cache_variant(v)} | {16, 64}))

    # Teacher: plain SFT from scratch
    set_seed(args.seed)
    teacher = build_model(args, "teacher", tokenizer)
    teacher_trainer = SFTTrainer(
        model=teacher,
        args=SFTConfig(**config_kwargs(args, str(work / "teacher"), args.teacher_steps, args.teacher_lr)),
        train_dataset=train_ds,
        processing_class=tokenizer,
    )
    wall = train_quietly(teacher_trainer)
    teacher = teacher_trainer.model
    teacher_eval = evaluate(teacher, eval_rows, args.eval_batch_size, ks)
    out["teacher"] = {
        "params": n_params(teacher),
        "train_s": wall,
        "s_per_step": wall / args.teacher_steps,
        "final_train_loss": last_logged_loss(teacher_trainer),
        **teacher_eval,
    }
    print(
        f"Teacher: held-out ppl {teacher_eval['ppl']:.3f} (unigram {out['data']['unigram_ppl']:.1f}), "
        f"{wall:.0f} s for {args.teacher_steps} steps; mass outside top-k {teacher_eval['outside_top_k']}",
        flush=True,
    )
    del teacher_trainer

    def distill_config(name: str, **extra) -> DistillationConfig:
        return DistillationConfig(
            **config_kwargs(args, str(work / name), args.student_steps, args.student_lr),
            divergence=args.divergence,
            temperature=1.0,
            alpha=0.0,
            **extra,
        )

    def new_student():
        set_seed(args.seed)
        return build_model(args, "student", tokenizer)

    # Caches: written once each by a trainer holding the live teacher (its student is never trained)
    cache_specs = sorted({cache_variant(v)[:3] for v in args.variants if cache_variant(v)})
    cache_paths = {}
    if cache_specs:
        writer = DistillationTrainer(
            model=new_student(),
            teacher_model=teacher,
            teacher_processing_class=tokenizer,  # same tokenizer: the vocabularies are checked
            args=distill_config("writer"),
            train_dataset=student_ds,
            processing_class=tokenizer,
        )
        for k, bits, tail in cache_specs:
            start = time.perf_counter()
            cache = writer.write_teacher_cache(
                str(work / "caches"),
                k=k,
                logprob_bits=bits,
                batch_size=args.cache_batch_size,
                show_progress=False,
                tail_samples=tail,
                seed=args.seed,
            )
            write_s = time.perf_counter() - start
            manifest = cache.manifest
            file_bytes = dir_bytes(Path(cache.path))
            scored = int(manifest["scored_positions"])
            cache_paths[(k, bits, tail)] = str(cache.path)
            name = f"k{k}_{bits}bit" + (f"_tail{tail}" if tail else "")
            out["caches"][name] = {
                "k": k,
                "bits": bits,
                "tail_samples": tail,
                "write_s": write_s,
                "rows": int(manifest["num_rows"]),
                "shards": int(manifest["num_shards"]),
                "scored_positions": scored,
                "payload_bytes": int(manifest["payload_bytes"]),
                "file_bytes": file_bytes,
                "bytes_per_logit": float(manifest["bytes_per_logit"]),
                "bytes_per_scored_token": file_bytes / scored,
            }
            print(f"Cache {name}: {json.dumps(out['caches'][name])}", flush=True)
        del writer

    # Students
    for variant in args.variants:
        set_seed(args.seed)
        if variant == "sft":
            trainer = SFTTrainer(
                model=new_student(),
                args=SFTConfig(**config_kwargs(args, str(work / variant), args.student_steps, args.student_lr)),
                train_dataset=student_ds,
                processing_class=tokenizer,
            )
        elif variant == "live":
            trainer = DistillationTrainer(
                model=new_student(),
                teacher_model=teacher,
                teacher_processing_class=tokenizer,  # same tokenizer: the vocabularies are checked
                args=distill_config(variant),
                train_dataset=student_ds,
                processing_class=tokenizer,
            )
        else:
            k, bits, tail, mode = cache_variant(variant)
            trainer = DistillationTrainer(
                model=new_student(),
                args=distill_config(
                    variant, teacher_cache=cache_paths[(k, bits, tail)], sparse_targets=mode or args.sparse_targets
                ),
                train_dataset=student_ds,
                processing_class=tokenizer,
            )
        wall = train_quietly(trainer)
        result = evaluate(trainer.model, eval_rows, args.eval_batch_size)
        out["variants"][variant] = {
            "params": n_params(trainer.model),
            "train_s": wall,
            "s_per_step": wall / args.student_steps,
            "final_train_loss": last_logged_loss(trainer),
            **result,
        }
        print(
            f"Student {variant}: held-out ppl {result['ppl']:.4f}, {wall:.0f} s ({wall / args.student_steps:.3f} "
            f"s/step), last logged train loss {out['variants'][variant]['final_train_loss']:.4f}",
            flush=True,
        )
        del trainer

    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out


# Report --------------------------------------------------------------------------------------------------------------


def variant_label(variant: str, args) -> str:
    if variant == "live":
        return "live teacher"
    if variant == "sft":
        return "SFT only (labels, no teacher)"
    k, bits, tail, mode = cache_variant(variant)
    sampled = f" ({k - tail} top + {tail} sampled from the tail)" if tail else ""
    return f"cache k = {k}{sampled}, {bits}-bit log-probs, {mode or args.sparse_targets}"


def report(args, out: dict, machine: str, wall: float) -> str:
    data, teacher, variants, caches = out["data"], out["teacher"], out["variants"], out["caches"]
    live = variants.get("live")
    rows = [["teacher (SFT, trained on the train split)", teacher["params"] / 1e6, teacher["ppl"], "", ""]]
    rows.append(["unigram (add-one smoothed train-split frequencies)", "", data["unigram_ppl"], "", ""])
    target_lines = []
    for variant, result in variants.items():
        rel = ""
        if live is not None and variant != "live":
            rel = f"{100 * (result['ppl'] / live['ppl'] - 1):+.2f} %"
        rows.append(
            [
                f"student: {variant_label(variant, args)}",
                result["params"] / 1e6,
                f"{result['ppl']:.3f}",
                rel,
                f"{result['s_per_step']:.3f}",
            ]
        )
    table = common.markdown_table(
        ["model", "params (M)", "held-out perplexity", "vs live student", "train s/step"], rows
    )
    if live is not None and "cache_k64_8bit" in variants:
        rel = variants["cache_k64_8bit"]["ppl"] / live["ppl"] - 1
        verdict = "meets" if abs(rel) <= 0.01 else "misses"
        target_lines.append(
            f"- Target: k = 64 (8-bit) within 1 % of the live-teacher student: {100 * rel:+.2f} % ({verdict})."
        )
    for variant, result in variants.items():
        spec = cache_variant(variant)
        if live is not None and spec and spec[0] == 64 and spec[2]:
            rel = result["ppl"] / live["ppl"] - 1
            verdict = "meets" if abs(rel) <= 0.01 else "misses"
            target_lines.append(
                f"- k = 64 with a sampled tail (`{variant}`: top {64 - spec[2]} + {spec[2]} draws from the teacher's "
                f"tail, forward KL on an unbiased target): {100 * rel:+.2f} % vs live ({verdict} the 1 % target)."
            )
    outside = teacher.get("outside_top_k", {})
    if outside:
        target_lines.append(
            "- Teacher's mean probability mass outside its top k on the held-out positions: "
            + ", ".join(f"k = {k}: {100 * v:.1f} %" for k, v in sorted(outside.items(), key=lambda kv: int(kv[0])))
            + "."
        )
    target_out = teacher.get("target_outside_top_k", {})
    if target_out:
        target_lines.append(
            "- Held-out next tokens outside the teacher's top k: "
            + ", ".join(f"k = {k}: {100 * v:.1f} %" for k, v in sorted(target_out.items(), key=lambda kv: int(kv[0])))
            + ". With `sparse_targets='bucket'` the student's logits outside the teacher's top k only get the "
            "gradient of the single rest bucket, shared in proportion to the student's own probabilities there: "
            "nothing tells it which of those tokens the teacher prefers, so every such target costs it perplexity "
            "(`'renormalize'` does not train the tail at all)."
        )
    if live is not None and "sft" in variants:
        target_lines.append(
            f"- Distillation vs labels: live-teacher student {live['ppl']:.3f}, SFT-only student "
            f"{variants['sft']['ppl']:.3f} (same steps, same initialisation, same data order)."
        )

    cache_rows = []
    live_step = live["s_per_step"] if live is not None else float("nan")
    for c in caches.values():
        cache_rows.append(
            [
                f"k = {c['k']}, {c['bits']}-bit" + (f", {c['tail_samples']} sampled" if c.get("tail_samples") else ""),
                c["rows"],
                c["scored_positions"],
                c["file_bytes"] / 2**20,
                f"{c['bytes_per_logit']:.3f}",
                f"{c['bytes_per_scored_token']:.1f}",
                f"{c['write_s']:.1f}",
                f"{c['write_s'] / live_step:.1f}" if live is not None else "",
            ]
        )
    cache_table = common.markdown_table(
        [
            "cache",
            "rows",
            "scored tokens",
            "on disk (MiB)",
            "bytes / kept logit (payload)",
            "bytes / scored token (files)",
            "write time (s)",
            "write time / live step",
        ],
        cache_rows,
    )
    full_logits = data["student_rows"] * args.seq_len * data["vocab"] * 4
    setup = (
        f"Data: `{os.path.basename(args.data)}`, first 90 % of the characters for training "
        f"({data['train_chars']} chars), last 10 % held out ({data['eval_chars']} chars). Tokenizer: byte-level BPE, "
        f"{data['vocab']} tokens, trained on the train split ({data['chars_per_token']:.2f} chars per token). Rows of "
        f"{args.seq_len} tokens: {data['train_rows']} train rows ({data['train_tokens']} tokens), "
        f"{data['eval_rows']} held-out rows ({data['eval_tokens']} tokens; perplexity over the "
        f"{teacher['tokens']} next-token predictions inside them). Models: Qwen2-style, float32, untied embeddings; "
        f"teacher {args.teacher_layers} layers x {args.teacher_hidden} trained from scratch with `SFTTrainer` for "
        f"{args.teacher_steps} steps (lr {args.teacher_lr:g}, final train loss {teacher['final_train_loss']:.3f}, "
        f"{teacher['s_per_step']:.2f} s/step); students {args.student_layers} layers x {args.student_hidden}, same "
        f"random initialisation, {args.student_steps} steps each (lr {args.student_lr:g}) over one epoch of the same "
        f"{data['student_rows']} rows (a seeded random subset of the train rows), same data order. All: "
        f"batch {args.batch_size} x {args.seq_len}, AdamW, cosine schedule with {max(1, args.student_steps // 20)} "
        f"(students) / {max(1, args.teacher_steps // 20)} (teacher) warm-up steps, seed {args.seed}, CPU. "
        f"Distillation: `divergence={args.divergence!r}`, `temperature=1`, `alpha=0` (pure distillation); caches "
        f"written by `DistillationTrainer.write_teacher_cache` over those {data['student_rows']} rows, students "
        f"trained from them with `sparse_targets={args.sparse_targets!r}` unless the row says otherwise. "
        f"For scale: full float32 teacher logits for those rows would take {full_logits / 2**20:.0f} MiB."
    )
    body = "\n".join(
        [
            "## Distillation quality: cached top-k teacher vs live teacher on tinyshakespeare "
            "(`benchmarks/cache_quality.py`)",
            "",
            setup,
            "",
            table,
            "",
            *target_lines,
            "",
            "Caches (8-bit: the quantised log-prob format of `docs/teacher_cache.md`; 32-bit: exact float32):",
            "",
            cache_table,
            "",
            f"Machine: {machine}. Total benchmark wall time {wall:.0f} s. Timings on a shared machine are "
            "indicative only.",
            "",
            "Command:",
            "",
            "```bash",
            common.command_line(),
            "```",
        ]
    )
    return body


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The text, tokenizer and batch flags shared with `bitnet_quality.py` (see [`prepare_data`])."""
    parser.add_argument("--data", default=DEFAULT_DATA, help="Text file (split 90 %% train / 10 %% held out).")
    parser.add_argument("--max-chars", type=int, default=None, help="Use only the first N characters of the file.")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (4 special tokens included).")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)


def add_run_arguments(parser: argparse.ArgumentParser, section: str, kept: str) -> None:
    """--seed, --work-dir (keeps `kept`), --quick/--write/--no-write/--doc-section and --json, shared with
    `bitnet_quality.py`."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help=f"Keep {kept} here (default: a temp dir).")
    common.add_write_arguments(
        parser,
        section,
        quick_help="Smoke run: tiny models and data, no docs update.",
        section_help=f"docs/benchmarks.md section (default {section!r}).",
    )
    parser.add_argument("--json", default=None, help="Also write the raw results to this JSON file.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--divergence", default="forward_kl", help="Distillation divergence (all variants).")
    parser.add_argument("--sparse-targets", default="bucket", choices=("bucket", "renormalize"))
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="Comma-separated: live, sft, cache_k<k>_<bits>bit (bits 4/8/16/32; sparse targets from "
        "--sparse-targets), cache_k<k>_<bits>bit_renorm (sparse_targets='renormalize') and "
        "cache_k<k>_<bits>bit_tail<n> (n of the k ids sampled from the teacher's tail; forward KL only).",
    )
    parser.add_argument("--cache-batch-size", type=int, default=32, help="Rows per teacher forward when caching.")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-eval-rows", type=int, default=None, help="Evaluate on at most N held-out rows.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a machine shared with other jobs, 2 threads waited on each other "
        "at every operation and ran 2-3x slower; 0: torch's choice).",
    )
    add_run_arguments(parser, SECTION, "the caches and outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_chars = args.max_chars or 120_000
        args.vocab, args.seq_len, args.batch_size = 320, 64, 8
        args.teacher_hidden, args.teacher_layers, args.teacher_steps = 64, 2, 30
        args.student_hidden, args.student_layers, args.student_steps = 32, 1, 10
        args.max_eval_rows = args.max_eval_rows or 32
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in ("live", "sft") and cache_variant(v) is None]
    if unknown:
        choices = "live, sft, cache_k<k>_<bits>bit, cache_k<k>_<bits>bit_renorm or cache_k<k>_<bits>bit_tail<n>"
        parser.error(f"Unknown variants {unknown}: use {choices}.")
    for variant in args.variants:
        spec = cache_variant(variant)
        if spec and not 0 <= spec[2] < spec[0]:
            parser.error(f"{variant}: the tail samples must be fewer than k.")
        if spec and spec[2] and args.divergence != "forward_kl":
            parser.error(f"{variant}: a sampled tail trains with --divergence forward_kl only.")
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
    body = report(args, out, machine, wall)
    print()
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **out}, indent=1, default=str))
    common.maybe_update_docs(args, body)


if __name__ == "__main__":
    main()
