"""The ``minift`` command: demo, train, finetune, dpo, generate, eval, export.

    minift demo                                   the whole story on bundled data (minutes)
    minift train --data corpus.txt --out runs/tiny            pretrain a tiny model from scratch
    minift finetune --model runs/tiny --data qa.jsonl --method freeze --out runs/ft
    minift generate --model runs/ft "How do I file a claim?" [--chat]
    minift eval --model runs/ft --data held_out.txt           loss and perplexity

    minift fetch smollm2                          download SmolLM2-135M-Instruct (GGUF, 98 MB) once
    minift chat --model smollm2                   talk to it; --model also takes a .gguf or a folder
    minift finetune --model smollm2 --method lora --steps 20 --lr 1e-3 --out runs/smol-lora
    minift forgetting --model smollm2 --methods full,freeze,lora --steps 10 --out runs/forgetting
    minift dpo --model smollm2 --out runs/smol-dpo   preference tuning (DPO) on the bundled insurer pairs

    minift serve --model runs/tiny --adapter legal=runs/a/adapter --slots 4 --port 8000   multi-LoRA HTTP
    minift bench-serve --requests 32 --rate 16             load test: throughput, TTFT and latency percentiles

    minift memory --params 7e9                    lecture 003's memory table (full / LoRA / QLoRA), assumptions printed
    minift memory --model runs/tiny --method qlora --batch 4 --seq 64     predicted vs measured (tracemalloc)
    minift memory --model runs/tiny --method lora --compare-checkpointing   measured with and without checkpointing
    minift memory --model runs/tiny --method lora --base-dtype bf16   the step with a 16-bit frozen base
    minift kernels check                          every CUDA kernel vs its NumPy reference (emulator, GPU)

    minift export --model runs/ft --format hf --out exports/ft             a Hugging Face folder (transformers, vLLM)
    minift export --model smollm2 --adapter runs/q/adapter --format gguf --dtype q8_0 --out smol.gguf   llama.cpp
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

from threadpoolctl import threadpool_limits

try:  # the first minift import picks the backend MINIFT_BACKEND names: one that cannot run is one line
    import minift.backend  # noqa: F401
except RuntimeError as exc:  # minift.backend.BackendUnavailableError, which never finished importing
    sys.exit(f"minift: {exc}")

from minift.allocator import keep_freed_memory
from minift.data import ByteTokenizer, DataLoader, InstructionDataset, TextDataset, bundled_path
from minift.data.packing import collate_packed, pack_examples, padding_share
from minift.data.preference import PreferenceDataset, collate_pairs
from minift.io import save_model
from minift.io.hub import FetchError
from minift.models.generate import TextStream, stream
from minift.nn import BASE_DTYPES, cast_frozen, dequantize_model, trainable_report
from minift.peft import PeftModel
from minift.studies.demo import DemoSettings, run_demo, tiny_config
from minift.studies.memory import LEDGER_METHODS
from minift.training import TrainConfig, Trainer, TrainingError, TrainingInterrupted, evaluate_loss, perplexity
from minift.training.checkpoint import discard_run, holds_run
from minift.training.dpo import LOSS_TYPES, DPOTrainer
from minift.training.export import FORMATS, export_model, format_drift
from minift.training.methods import METHODS, MethodOptions, prepare_model
from minift.training.pretrained import (
    adapter_base_name,
    adapter_of,
    base_model_reference,
    load_pretrained,
    save_pretrained,
)
from minift.training.trainer import OPTIMIZERS


def _system_prompt(args, tok):
    """--system, else the model's own default (SmolLM2's template inserts one), so that training
    examples are rendered exactly as ``apply_chat_template`` renders a question at inference."""
    return args.system if args.system is not None else getattr(tok, "default_system_prompt", None)


def _train_config(args, out: Path) -> TrainConfig:
    return TrainConfig(max_steps=args.steps, lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
                       weight_decay=args.weight_decay, grad_accum_steps=args.grad_accum,
                       max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                       save_every=args.save_every, out_dir=str(out), seed=args.seed, optimizer=args.optim)


def _run(trainer: Trainer, args) -> None:
    """Train in --out: continue its run with --resume, replace it with --overwrite; a new run never
    silently mixes its checkpoints and metrics with an older one."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it; give one of them")
    if args.resume and trainer.resume():
        print(f"resumed from step {trainer.step}")
    elif holds_run(trainer.out_dir) and not args.resume:
        if not args.overwrite:
            raise ValueError(f"{trainer.out_dir} already holds a training run (checkpoints, metrics.jsonl). "
                             f"Continue it with --resume, replace it with --overwrite, or choose another --out")
        discard_run(trainer.out_dir)
    trainer.train()


#: The demo's tiny model multiplies 128-wide matrices: too small to split across threads, and a
#: second BLAS thread that busy-waits makes every step ~10x slower whenever another program
#: keeps a core busy (measured: 0.28 s/step with 1 thread, 3.5 s/step with 2, one core taken).
DEFAULT_THREADS = {"demo": 1}


def cmd_demo(args) -> None:
    run_demo(args.out, DemoSettings.fast() if args.fast else DemoSettings(), resume=args.resume,
             overwrite=args.overwrite)


def _load(name: str):
    """``load_pretrained`` with a status line on stderr (stdout stays the answer alone): reading
    SmolLM2 takes seconds, tens of them on a busy machine, and silence looks like a hang."""
    print(f"loading {name} ...", end=" ", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        loaded = load_pretrained(name)
    except BaseException:
        print(file=sys.stderr)  # the error (or Ctrl-C) starts a line of its own
        raise
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return loaded


def cmd_train(args) -> None:
    tok = ByteTokenizer()
    text = Path(args.data).read_text()
    loader = DataLoader(TextDataset(text, tok, args.block_size), args.batch_size, seed=args.seed, pad_id=tok.pad_id)
    from minift.models import LlamaForCausalLM  # noqa: PLC0415

    model = LlamaForCausalLM(tiny_config(tok.vocab_size), seed=args.seed)
    print(trainable_report(model))
    _run(Trainer(model, _train_config(args, Path(args.out)), loader), args)
    save_model(model, args.out)
    print(f"model saved to {args.out}")


def cmd_finetune(args) -> None:
    model, tok = _load(args.model)
    system = _system_prompt(args, tok)
    options = MethodOptions(layers=args.layers, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            bottleneck=args.bottleneck, prefix_tokens=args.prefix_tokens, seed=args.seed)
    model, description = prepare_model(model, args.method, options)
    print(description)
    _store_base(model, args.base_dtype)
    if args.gradient_checkpointing is not None:
        model.gradient_checkpointing_enable(_checkpointed_blocks(args, model.config.n_layers))
    print(trainable_report(model))
    data = args.data or bundled_path("insurer_train.jsonl")
    dataset = InstructionDataset(data, tok, model.config.max_seq_len, system_prompt=system)
    loader = DataLoader(dataset, args.batch_size, seed=args.seed, pad_id=tok.pad_id)
    if args.packing:
        loader = _packed_loader(dataset, model.config.max_seq_len, args, tok.pad_id)
    eval_loader = None
    if args.eval_data:
        eval_set = InstructionDataset(args.eval_data, tok, model.config.max_seq_len, system_prompt=system)
        eval_loader = DataLoader(eval_set, args.batch_size, shuffle=False, pad_id=tok.pad_id)
    _run(Trainer(model, _train_config(args, Path(args.out)), loader, eval_loader), args)
    _save_trained(model, tok, args, options)


def _packed_loader(dataset, context: int, args, pad_id: int) -> DataLoader:
    """--packing: the examples packed into rows of --pack-len tokens (minift/data/packing.py), with
    the padding share they save printed. By default a row holds 256 tokens, or the longest example."""
    longest = max(len(example["input_ids"]) for example in dataset)
    pack_len = min(args.pack_len or max(256, longest), context)
    rows = pack_examples(dataset, pack_len)

    def first_epoch(data, **collating):  # a fresh loader: the batches of epoch 0, the cursor untouched
        return DataLoader(data, args.batch_size, seed=args.seed, pad_id=pad_id, **collating)

    print(f"packing: {len(dataset)} examples in {len(rows)} rows of at most {pack_len} tokens; padding in the "
          f"first epoch: {padding_share(first_epoch(dataset)):.1%} padded, "
          f"{padding_share(first_epoch(rows, collate_fn=collate_packed)):.1%} packed")
    return first_epoch(rows, collate_fn=collate_packed)


def _store_base(model, dtype: str) -> None:
    """--base-dtype: the frozen Linear weights and embedding stored in 16 bits, widened per product
    (docs/training.md)."""
    if dtype != "float32":
        names = cast_frozen(model, dtype)
        print(f"frozen base: {len(names)} weights (the Linear ones and the embedding) stored in {dtype}; "
              "what trains stays float32")


def _save_trained(model, tok, args, options: MethodOptions) -> None:
    """What a finished run leaves in --out: a LoRA run its PEFT adapter in ``adapter/`` (and with
    --save-merged the merged model too), any other run the whole model. A 16-bit base is widened
    back to float32 first (exact), so every file is float32 as without --base-dtype."""
    cast_frozen(model, "float32")
    if isinstance(model, PeftModel):
        # the base is named as PEFT needs it (hub id or absolute path), so the adapter folder stands alone
        started_from = adapter_of(args.model)  # DPO after a LoRA run: name that run's base, not the run
        model.peft_config[model.active_adapter].base_model_name_or_path = base_model_reference(
            adapter_base_name(started_from) if started_from else args.model)
        model.save_pretrained(Path(args.out) / "adapter")
        print(f"LoRA adapter saved in PEFT format to {Path(args.out) / 'adapter'} (base: {args.model})")
        if not args.save_merged:
            return
        dequantize_model(model)  # QLoRA: merge into float weights (exact) and save those, not NF4
        model = model.merge_and_unload()
    surgery = {"method": args.method, **asdict(options)} if args.method in ("adapter", "prefix") else None
    save_pretrained(model, tok, args.out, surgery=surgery)
    print(f"model saved to {args.out}" + ("" if surgery else " as a Hugging Face folder"))


BUNDLED_PREFERENCES = ("insurer_preferences_train.jsonl", "insurer_preferences_eval.jsonl")

#: What the reference of a DPO run is, in a sentence (``minift.training.dpo.choose_reference``).
REFERENCE_NOTES = {
    "disabled_adapter": "the starting model = this network with its fresh adapter switched off (no copy)",
    "precomputed": "the starting model's log-probabilities of every pair, computed once before step 1",
}


def cmd_dpo(args) -> None:
    model, tok = _load(args.model)
    system = _system_prompt(args, tok)
    options = MethodOptions(lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed)
    if isinstance(model, PeftModel):  # a LoRA run or adapter folder: DPO after SFT trains that adapter on
        if args.method != "lora":
            raise ValueError(f"{args.model} is a LoRA adapter: continue it with --method lora, or merge it into "
                             f"its base first (minift export) for --method {args.method}")
        print(f"training the adapter of {args.model} further")
    else:
        model, description = prepare_model(model, args.method, options)
        print(description)
    _store_base(model, args.base_dtype)
    if args.gradient_checkpointing is not None:
        model.gradient_checkpointing_enable(_checkpointed_blocks(args, model.config.n_layers))
    print(trainable_report(model))
    data, eval_data = args.data, args.eval_data
    if data is None:
        data, eval_data = bundled_path(BUNDLED_PREFERENCES[0]), eval_data or bundled_path(BUNDLED_PREFERENCES[1])
    loader, eval_loader = (
        DataLoader(PreferenceDataset(path, tok, model.config.max_seq_len, system_prompt=system), args.batch_size,
                   shuffle=shuffle, seed=args.seed, pad_id=tok.pad_id, collate_fn=collate_pairs) if path else None
        for path, shuffle in ((data, True), (eval_data, False)))
    trainer = DPOTrainer(model, _train_config(args, Path(args.out)), loader, eval_loader, beta=args.beta,
                         loss_type=args.loss_type)
    print(f"reference: {REFERENCE_NOTES[trainer.reference]}")
    _run(trainer, args)
    if eval_loader is not None:
        _report_preferences(trainer)
    _save_trained(model, tok, args, options)


def _report_preferences(trainer) -> None:
    """The held-out pairs after training, and the warning sign of over-optimization."""
    h = trainer.history
    evaluated_now = trainer.eval_metrics and h.eval_steps and h.eval_steps[-1] == trainer.step
    loss = h.eval_losses[-1] if evaluated_now else trainer.evaluate()  # the last step's eval, when there was one
    m = trainer.eval_metrics
    print(f"held-out pairs: loss {loss:.4f} (ln 2 = 0.6931 at the start), reward accuracy "
          f"{m['eval_rewards/accuracies']:.2f}, margin {m['eval_rewards/margins']:+.3f}, "
          f"chosen {m['eval_rewards/chosen']:+.3f}, rejected {m['eval_rewards/rejected']:+.3f}")
    if m["eval_rewards/chosen"] < 0:
        print("note: the chosen answers became less likely than at the start (negative chosen reward); "
              "if it keeps falling the model is drifting from every answer (docs/preference.md, collapse): "
              "fewer steps, a lower --lr or a larger --beta")
    print(f"rewards and accuracy over the steps: {Path(trainer.out_dir) / 'rewards.png'}")


def cmd_export(args) -> None:
    report = export_model(args.model, args.out, args.format, adapter=args.adapter, adapter_base=args.adapter_base,
                          dtype=args.dtype)
    if args.adapter:
        print(f"merged the adapter {args.adapter} into the {report.adapter_base}")
        print(format_drift({"merged model": report.drift}, "logits vs. unmerged, as trained"))
    kind = "Hugging Face folder" if report.fmt == "hf" else "GGUF file"
    print(f"wrote {report.path} ({kind}, {report.dtype}):")
    for name, size in report.files.items():
        print(f"  {name:<32}{size:>15,} bytes")
    if len(report.files) > 1:
        print(f"  {'total':<32}{sum(report.files.values()):>15,} bytes")


def _reply(model, tok, text: str, args, stop: bool) -> str:
    """Print the model's continuation of ``text`` token by token as it is generated (through the
    KV cache, ``minift.models.generate.stream``) -> the text printed. ``stop`` ends at the
    tokenizer's eos, and then a reply the token limit cut short is marked "[max tokens]".
    Ctrl-C ends the reply early and keeps what was said ("[stopped]")."""
    ids = tok.encode(text)
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {model.config.max_seq_len}. "
                         f"Shorten it (in a chat: /reset)")
    limit = min(args.max_new_tokens, room)
    tokens = stream(model, [ids], limit, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    eos_id=tok.eos_id if stop else None, seed=args.seed)
    shown, count, ended = TextStream(tok), 0, False
    try:
        for token in tokens:
            count += 1
            ended = stop and int(token[0]) == tok.eos_id
            _show(shown.push(token[0]))
    except KeyboardInterrupt:
        tokens.close()
        _show(shown.finish())
        print(" [stopped]")
        return shown.shown
    _show(shown.finish())
    cut = stop and not ended and count == limit
    print("" if not cut else " [max tokens]" if limit == args.max_new_tokens else " [context full]")
    return shown.shown


def _show(text: str) -> None:
    print(text, end="", flush=True)


def cmd_generate(args) -> None:
    model, tok = _load(args.model)
    text = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        text = tok.apply_chat_template(messages + [{"role": "user", "content": text}], add_generation_prompt=True)
    _reply(model, tok, text, args, stop=args.chat)


def cmd_chat(args) -> None:
    """An interactive conversation: the whole history is re-sent each turn (the model is stateless)."""
    model, tok = _load(args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("chat with the model: an empty line, Ctrl-D or Ctrl-C quits; Ctrl-C during a reply stops the reply; "
          "/reset forgets the conversation")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()  # the shell's prompt goes on a line of its own, not after "you> "
            break
        if not line:
            break
        if line == "/reset":
            history = []
            print("history cleared: the next message starts a new conversation")
            continue
        history.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(system + history, add_generation_prompt=True)
        print("model> ", end="", flush=True)
        reply = _reply(model, tok, prompt, args, stop=True).strip()
        history.append({"role": "assistant", "content": reply})


def cmd_fetch(args) -> None:
    from minift.io.hub import fetch  # noqa: PLC0415

    print(fetch(args.name))


def cmd_forgetting(args) -> None:
    from minift.studies.forgetting import ForgettingSettings, run_forgetting  # noqa: PLC0415

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    model, tok = _load(args.model)
    settings = ForgettingSettings(methods=methods, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  qa_questions=args.qa_questions, ppl_blocks=args.ppl_blocks, seed=args.seed)
    run_forgetting(model, tok, settings, args.out)


def cmd_eval(args) -> None:
    model, tok = _load(args.model)
    if args.data.endswith(".jsonl"):
        dataset = InstructionDataset(args.data, tok, model.config.max_seq_len, system_prompt=_system_prompt(args, tok))
    else:
        dataset = TextDataset(Path(args.data).read_text(), tok, args.block_size)
    loss = evaluate_loss(model, DataLoader(dataset, args.batch_size, shuffle=False, pad_id=tok.pad_id))
    print(f"loss {loss:.4f}  perplexity {perplexity(loss):.2f}")


def cmd_serve(args) -> None:
    from minift.serve.engine import build_engine  # noqa: PLC0415
    from minift.serve.server import CompletionServer, parse_adapter_specs  # noqa: PLC0415

    if args.allow_runtime_lora != (args.lora_root is not None):
        raise ValueError("--allow-runtime-lora and --lora-root DIR (the folder whose adapters clients may "
                         "load) go together; give both or neither")
    model, tok = _load(args.model)
    engine = build_engine(model, parse_adapter_specs(args.adapter), args.slots, args.max_batch, tok.eos_id,
                          quantize=args.quantize, wrap_all=args.allow_runtime_lora,
                          max_rank=args.max_lora_rank if args.allow_runtime_lora else None)
    server = CompletionServer(engine, tok, port=args.port, window_ms=args.batch_window_ms, verbose=True,
                              host=args.host, socket_timeout_s=args.socket_timeout,
                              allow_runtime_lora=args.allow_runtime_lora, lora_root=args.lora_root,
                              batching=args.batching)
    print(f"serving models {['base'] + [f'base:{n}' for n in engine.library.names()]} at "
          f"{server.url}/v1/completions and /v1/chat/completions (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")


def cmd_bench_serve(args) -> None:
    import json  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from minift.serve.engine import build_engine  # noqa: PLC0415
    from minift.serve.server import parse_adapter_specs  # noqa: PLC0415
    from minift.studies.serve_bench import LoadSpec, format_report, run_load, synthetic_setup  # noqa: PLC0415

    if args.adapter and not args.model:
        raise ValueError("--adapter needs --model (without both, random adapters on a small model are used)")
    spec = LoadSpec(args.requests, args.rate, args.prompt_words, args.max_tokens, args.base_share, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            (model, tok), adapters = _load(args.model), parse_adapter_specs(args.adapter)
        else:
            model, tok, adapters = synthetic_setup(tmp, args.adapters)
        engine = build_engine(model, adapters, args.slots, args.max_batch, tok.eos_id)
    report = run_load(engine, tok, spec, args.batching)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def _int_range(text: str) -> tuple[int, int]:
    """``"8,32"`` -> (8, 32); ``"16"`` -> (16, 16): a range flag, or one value for every request."""
    try:
        low, high = (int(part) for part in (text.split(",") if "," in text else [text, text]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW,HIGH (integers), got {text!r}") from None
    return low, high


def cmd_kernels(args) -> None:
    from minift.cuda.check import check, format_table  # noqa: PLC0415

    results = check()
    print(format_table(results))
    failed = [r.kernel + " on " + r.path for r in results if not r.passed]
    if failed:
        raise ValueError(f"{len(failed)} kernel check(s) beyond tolerance: {', '.join(failed)}")


def cmd_memory(args) -> None:
    from minift.studies import memory  # noqa: PLC0415

    if (args.params is None) == (args.model is None):
        raise ValueError("give either --params N (a projection) or --model DIR (predict and measure)")
    if args.params is not None:
        if args.gradient_checkpointing is not None or args.compare_checkpointing:
            raise ValueError("--gradient-checkpointing and --compare-checkpointing measure a "
                             "--model; the --params projection already assumes checkpointing (drop the flag)")
        if args.base_dtype != "float32":
            raise ValueError("--base-dtype measures a --model; the --params projection already "
                             "assumes bf16 weights (drop the flag)")
        print(memory.format_projection(args.params, seq=args.seq or 2048, batch=args.batch, optimizer=args.optim))
        return
    model, _ = _load(args.model)
    shape = (model, args.method, args.batch, args.seq or 64, MethodOptions(lora_r=args.lora_r))
    if args.compare_checkpointing:
        print(memory.compare_checkpointing(*shape, base_dtype=args.base_dtype, optimizer=args.optim,
                                           checkpointed_blocks=_checkpointed_blocks(args, model.config.n_layers)))
    else:
        print(memory.ledger(*shape, checkpointing=args.gradient_checkpointing is not None, base_dtype=args.base_dtype,
                            optimizer=args.optim,
                            checkpointed_blocks=_checkpointed_blocks(args, model.config.n_layers)))


def _add_training_flags(p) -> None:
    p.add_argument("--out", required=True, help="folder for checkpoints, metrics.jsonl, curves.png and the model")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps to run")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (lecture 000: 1e-5..5e-5 for full "
                   "fine-tuning of a large model, ~1e-4..1e-3 for LoRA)")
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"],
                   help="how the learning rate decays after the warmup")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="share of the steps that ramp the rate up from 0")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay (not on "
                   "norms and biases)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches whose gradients add up into one "
                   "step (effective batch = batch size x this)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this")
    _add_optim_flag(p)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations on --eval-data "
                   "(0: never); they draw the eval line of curves.png")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (one is always "
                   "written at the end and on Ctrl-C)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the batch order")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out "
                   "(after Ctrl-C: the same command with --resume)")
    p.add_argument("--overwrite", action="store_true", help="delete the training run already in --out "
                   "(checkpoints, metrics, plots) and start again")


def _add_optim_flag(p) -> None:
    p.add_argument("--optim", default="adamw", choices=sorted(OPTIMIZERS), help="adamw8bit: AdamW with its two "
                   "moments stored in 8 bits, 2 bytes per trained parameter instead of 8 (docs/training.md)")


def _add_checkpointing_flag(p) -> None:
    p.add_argument("--gradient-checkpointing", nargs="?", const="all", type=_block_count, metavar="BLOCKS",
                   help="keep only each block's input in the forward and recompute the block in backward: far "
                   "less activation memory for one extra forward per block. Alone: every block; BLOCKS: only "
                   "the bottom that many, less memory saved for less time lost (docs/training.md)")


def _block_count(text: str) -> int | str:
    """--gradient-checkpointing's value: "all" or a count of blocks (checked against the model
    once it is loaded, ``_checkpointed_blocks``)."""
    if text == "all":
        return text
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a block count: give a whole number from 0 to the "
                                         "model's number of blocks, or no value (or 'all') for every block")
    return int(text)


def _checkpointed_blocks(args, n_layers: int) -> int | None:
    """--gradient-checkpointing's count as the model takes it: None for every block (and when
    the flag is absent, which checkpoints nothing anyway)."""
    blocks = args.gradient_checkpointing
    if blocks is None or blocks == "all":
        return None
    if blocks > n_layers:
        raise ValueError(f"--gradient-checkpointing {blocks}: the model has {n_layers} blocks; give a count "
                         f"from 0 to {n_layers}, or no value for every block")
    return blocks


def _add_base_dtype_flag(p) -> None:
    p.add_argument("--base-dtype", default="float32", choices=BASE_DTYPES, help="store the frozen Linear "
                   "weights in 16 bits (half their memory; widened to float32 per product); what trains stays "
                   "float32. Needs a frozen base: refused with --method full (docs/training.md)")


def _add_sampling_flags(p, max_new_tokens: int) -> None:
    """How generated tokens are chosen (``minift.models.generate``): greedy at temperature 0."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="the most tokens a reply may have (a cut reply ends with [max tokens])")
    p.add_argument("--temperature", type=float, default=0.0, help="0: always the most likely token (greedy); "
                   "higher: sample, more varied")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens (with --temperature)")
    p.add_argument("--top-p", type=float, help="sample only among the most likely tokens whose probabilities "
                   "add up to p (nucleus; with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (same seed, same answer)")


def _add_serving_flags(p) -> None:
    p.add_argument("--adapter", action="append", metavar="NAME=FOLDER", help="a PEFT adapter folder; repeat")
    p.add_argument("--slots", type=int, default=4, help="adapters held in device slots at once (LRU)")
    p.add_argument("--max-batch", type=int, default=16, help="rows per batch at most")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its description (none for flags without one), and the examples
    at the bottom kept line by line as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _command(sub, name: str, help_text: str, examples: str, func) -> argparse.ArgumentParser:
    """A subcommand whose --help shows defaults and ends with ``examples`` (one per line)."""
    p = sub.add_parser(name, help=help_text, description=textwrap.fill(help_text[0].upper() + help_text[1:] + "."),
                       epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
                       formatter_class=_HelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="LLM fine-tuning from scratch, in NumPy. "
                                     "Each command has its own --help, with examples.",
                                     epilog="examples:" + __doc__.split("\n", 1)[1].rstrip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="BLAS threads for matrix products (default: the BLAS "
                        "library's choice; 1 for the demo's tiny model)")
    sub = parser.add_subparsers(dest="command", required=True)

    methods = DemoSettings().methods
    p = _command(sub, "demo", f"pretrain a tiny model, fine-tune a copy with each of {len(methods)} methods "
                 f"({', '.join(methods)}), compare what each learned and forgot", """
minift demo                          the whole story, a few minutes
minift demo --fast --out runs/quick  a few steps of each stage (seconds)
minift demo --resume                 continue a demo stopped with Ctrl-C
minift demo --overwrite              delete the run in --out and start again""", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="folder for every model, curve, table and picture")
    p.add_argument("--fast", action="store_true", help="a few steps of each stage only (a smoke test)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: finished stages are kept, "
                   "the interrupted one goes on from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the demo run already in --out and start again")

    p = _command(sub, "train", "pretrain a tiny byte-level model on a text file", """
minift train --data corpus.txt --out runs/tiny
minift train --data corpus.txt --out runs/tiny --steps 500 --block-size 256""", cmd_train)
    p.add_argument("--data", required=True, help="a UTF-8 text file to learn from")
    p.add_argument("--block-size", type=int, default=128, help="tokens (bytes) per training sequence")
    _add_training_flags(p)

    p = _command(sub, "finetune", "fine-tune a saved or pretrained model on instruction JSONL", """
minift finetune --model runs/tiny --method freeze --out runs/ft
minift finetune --model smollm2 --method lora --steps 20 --lr 1e-3 --out runs/smol-lora
minift finetune --model smollm2 --method qlora --data my.jsonl --eval-data held.jsonl --eval-every 10 --out runs/q""",
                 cmd_finetune)
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--data", help="instruction JSONL, one chat ({\"messages\": [...]}) or Alpaca record per line "
                   "(default: the bundled insurer set)")
    p.add_argument("--eval-data", help="held-out JSONL in the same format: its loss every --eval-every steps")
    p.add_argument("--method", default="full", choices=METHODS, help="which weights train (docs/training.md)")
    p.add_argument("--layers", type=int, help="blocks to freeze from the bottom (freeze) or to train on top (last)")
    p.add_argument("--lora-r", type=int, default=8, help="rank of the LoRA update B A (lora, qlora)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA scale: the update is multiplied by alpha / r")
    p.add_argument("--bottleneck", type=int, default=16, help="adapter width (method adapter)")
    p.add_argument("--prefix-tokens", type=int, default=8, help="virtual tokens (method prefix)")
    p.add_argument("--system", help="system prompt added to every example (default: the model's own, if any)")
    p.add_argument("--save-merged", action="store_true",
                   help="lora/qlora: also save the model with the adapter merged in, as a Hugging Face folder in --out")
    p.add_argument("--packing", action="store_true", help="pack several examples into each row, each "
                   "attending only to itself, instead of padding them (default: off; docs/training.md)")
    p.add_argument("--pack-len", type=int, help="tokens per packed row with --packing (default: 256, or the "
                   "longest example if longer; at most the model's context)")
    _add_training_flags(p)
    _add_checkpointing_flag(p)
    _add_base_dtype_flag(p)

    p = _command(sub, "dpo", "preference-tune a model on chosen/rejected pairs (DPO or IPO), after SFT", """
minift dpo --model smollm2 --out runs/smol-dpo
minift dpo --model runs/smol-lora --out runs/smol-lora-dpo       DPO after a LoRA SFT run: its adapter trains on
minift dpo --model smollm2 --data pairs.jsonl --method full --lr 1e-5 --beta 0.2 --out runs/mine""", cmd_dpo)
    p.add_argument("--model", required=True, help="a model folder, a LoRA run or adapter folder, a .gguf file, "
                   "or smollm2")
    p.add_argument("--data", help="preference JSONL, one {\"prompt\", \"chosen\", \"rejected\"} per line (TRL's "
                   "shape) (default: the bundled insurer pairs)")
    p.add_argument("--eval-data", help="held-out pairs in the same format (default with the bundled data: its "
                   "held-out pairs)")
    p.add_argument("--method", default="lora", choices=("lora", "full"), help="lora: the reference is the "
                   "adapter switched off; full: every weight trains, the reference is precomputed")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull toward the reference: small "
                   "lets the policy drift further (docs/preference.md)")
    p.add_argument("--loss-type", default="sigmoid", choices=LOSS_TYPES, help="sigmoid: DPO's -log sigmoid; "
                   "ipo: the squared per-token margin toward 1/(2 beta)")
    p.add_argument("--lora-r", type=int, default=8, help="rank of a new LoRA adapter")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA scale: the update is multiplied by alpha / r")
    p.add_argument("--system", help="system prompt added to every prompt (default: the model's own, if any)")
    p.add_argument("--save-merged", action="store_true",
                   help="lora: also save the model with the adapter merged in, as a Hugging Face folder in --out")
    _add_training_flags(p)
    _add_checkpointing_flag(p)
    _add_base_dtype_flag(p)
    p.set_defaults(steps=30, lr=5e-4, batch_size=4, warmup_ratio=0.1, eval_every=10, save_every=10)

    p = _command(sub, "export", "write a model (an adapter merged in) as a Hugging Face folder or a GGUF file", """
minift export --model runs/ft --format hf --out exports/ft
minift export --model smollm2 --adapter runs/q/adapter --format gguf --dtype q8_0 --out smol.gguf""", cmd_export)
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder to merge into the model first")
    p.add_argument("--adapter-base", choices=("nf4", "float"), help="merge into the dequantized NF4 base "
                   "(QLoRA; default when the adapter records it) or the original float weights")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="hf: a folder transformers and vLLM "
                   "load; gguf: one file llama.cpp loads")
    p.add_argument("--out", required=True, help="the folder (hf) or .gguf file (gguf) to create")
    p.add_argument("--dtype", help="; ".join(f"{fmt}: {', '.join(dtypes)}" for fmt, dtypes in FORMATS.items())
                   + " (default f32)")

    p = _command(sub, "generate", "continue a prompt (or answer it with --chat), printed as it is generated", """
minift generate --model runs/demo/lora --chat "How do I file a claim?"
minift generate --model smollm2 --chat --max-new-tokens 60 "What is a deductible?"
minift generate --model smollm2 --temperature 0.8 --top-p 0.9 "Once upon a time\"""", cmd_generate)
    p.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template and "
                   "stop at the end of the assistant's turn")
    p.add_argument("--system", help="system prompt (with --chat)")
    _add_sampling_flags(p, max_new_tokens=100)

    p = _command(sub, "chat", "an interactive chat with a model, replies printed as they are generated", """
minift chat --model smollm2
minift chat --model runs/smol-lora --system "You answer for an insurer."
  (in the chat: /reset forgets the conversation; Ctrl-C stops a reply; Ctrl-D or an empty line quits)""", cmd_chat)
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--system", help="system prompt (default: the model's own, if its template has one)")
    _add_sampling_flags(p, max_new_tokens=200)

    p = _command(sub, "fetch", "download a pretrained model into the cache ($MINIFT_CACHE)", """
minift fetch smollm2""", cmd_fetch)
    p.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct as GGUF (98 MB)")

    p = _command(sub, "forgetting", "general QA accuracy and perplexity before/after each method", """
minift forgetting --model smollm2 --methods full,freeze,lora --steps 10 --out runs/forgetting
minift forgetting --methods lora,qlora --lr 1e-3 --qa-questions 80""", cmd_forgetting)
    p.add_argument("--model", default="smollm2", help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--methods", default="full,freeze,lora", help="comma-separated, from: " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=10, help="fine-tuning steps per method")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--lr", type=float, help="one learning rate for all methods (default: per method)")
    p.add_argument("--qa-questions", type=int, default=40, help="general QA questions asked")
    p.add_argument("--ppl-blocks", type=int, default=16, help="128-token blocks of held-out text")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order and new weights")
    p.add_argument("--out", default="runs/forgetting", help="folder for forgetting.json and forgetting.png")

    p = _command(sub, "eval", "loss and perplexity on a .txt or .jsonl file", """
minift eval --model runs/tiny --data held_out.txt
minift eval --model runs/smol-lora --data held_out.jsonl""", cmd_eval)
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--data", required=True, help=".txt: plain text in blocks; .jsonl: instruction records "
                   "(the loss counts the answers only)")
    p.add_argument("--system", help="system prompt for .jsonl records (default: the model's own, if any)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block of a .txt file")
    p.add_argument("--batch-size", type=int, default=8, help="blocks or records per forward pass")

    p = _command(sub, "serve", "serve a model and its LoRA adapters over HTTP (OpenAI-compatible completions "
                 "and chat, streamed or not)", """
minift serve --model runs/tiny --adapter legal=runs/a/adapter --slots 4 --port 8000
minift serve --model smollm2 --host 0.0.0.0 --port 8000    (reachable from other machines)
minift serve --model smollm2 --quantize nf4 --adapter q=runs/qlora/adapter   (QLoRA adapters over their 4-bit base)
minift serve --model smollm2 --allow-runtime-lora --lora-root runs/adapters   (POST /v1/load_lora_adapter)""",
                 cmd_serve)
    p.add_argument("--model", required=True, help="the base model: a folder, a .gguf file, or smollm2")
    _add_serving_flags(p)
    p.add_argument("--quantize", choices=["nf4"], help="store the base's block projections in NF4 (as "
                   "finetune --method qlora does) and serve the adapters over that 4-bit base")
    p.add_argument("--allow-runtime-lora", action="store_true", help="enable POST /v1/load_lora_adapter and "
                   "/v1/unload_lora_adapter (vLLM's routes); wraps every projection at start-up")
    p.add_argument("--lora-root", help="with --allow-runtime-lora: the only folder runtime adapters may be "
                   "loaded from (symlinks and .. are resolved first)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="with --allow-runtime-lora: the largest rank "
                   "an adapter may have (sizes the slots)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                   "the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 picks a free one)")
    p.add_argument("--socket-timeout", type=float, default=30.0,
                   help="seconds a connection may stay silent (a half-sent body, an idle keep-alive)")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: a request joins the running batch at the next decode step; static: "
                   "requests that arrive within --batch-window-ms run as one batch to its end")
    p.add_argument("--batch-window-ms", type=float, default=15.0,
                   help="with --batching static: wait this long to batch requests together")

    p = _command(sub, "bench-serve", "load test: Poisson arrivals of mixed-adapter streamed requests to an "
                 "in-process server; throughput, TTFT and latency percentiles", """
minift bench-serve --requests 32 --rate 16 --adapters 4
minift bench-serve --rate 64 --max-tokens 8,64 --batching continuous --json runs/load.json""", cmd_bench_serve)
    p.add_argument("--model", help="default: a small random model with --adapters random adapters")
    _add_serving_flags(p)
    p.add_argument("--adapters", type=int, default=4, help="random adapters when no --model is given")
    p.add_argument("--requests", type=int, default=32, help="requests sent")
    p.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second (exponential gaps)")
    p.add_argument("--max-tokens", type=_int_range, default=(8, 32), metavar="N|LOW,HIGH",
                   help="tokens generated per request, drawn per request")
    p.add_argument("--prompt-words", type=_int_range, default=(2, 20), metavar="N|LOW,HIGH",
                   help="words per prompt, drawn per request")
    p.add_argument("--base-share", type=float, default=0.25, help="share of requests for the base model")
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule (the same seed, the same load)")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="the server's scheduler: whole batches, or rows joining and leaving at every step")
    p.add_argument("--json", help="also write the full report (every request's timings) to this file")

    p = _command(sub, "kernels", "the CUDA kernels: 'check' runs each on every path against NumPy", """
minift kernels check""", cmd_kernels)
    p.add_argument("action", choices=["check"], help="check: each kernel against its NumPy reference")

    p = _command(sub, "memory", "the memory ledger: bytes of weights, gradients, optimizer, activations", """
minift memory --params 7e9
minift memory --params 7e9 --optim adamw8bit
minift memory --model runs/tiny --method qlora --batch 4 --seq 64
minift memory --model smollm2 --method lora --batch 2 --seq 64 --compare-checkpointing
minift memory --model smollm2 --method lora --batch 4 --seq 128 --compare-checkpointing --gradient-checkpointing 20
minift memory --model smollm2 --method lora --batch 2 --seq 64 --base-dtype bf16
minift memory --model smollm2 --method full --batch 4 --seq 128 --optim adamw8bit""", cmd_memory)
    p.add_argument("--params", type=float, help="project lecture 003's table to N parameters (e.g. 7e9)")
    p.add_argument("--model", help="predict and measure one training step of this model")
    p.add_argument("--method", default="lora", choices=LEDGER_METHODS, help="which weights train")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, help="tokens per row (default: 2048 with --params, 64 with --model)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (lora, qlora)")
    _add_checkpointing_flag(p)
    p.add_argument("--compare-checkpointing", action="store_true", help="measure the step twice, without and "
                   "with gradient checkpointing (every block, or the bottom N with --gradient-checkpointing N), "
                   "and print both columns and their ratio")
    _add_base_dtype_flag(p)
    _add_optim_flag(p)
    return parser


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same one, with ``--resume`` (and
    without ``--overwrite``, which would delete what is to be continued)."""
    words = ["minift", *(w for w in argv if w != "--overwrite")] + ([] if "--resume" in argv else ["--resume"])
    return " ".join(shlex.quote(w) for w in words)


#: The shell's convention for "stopped by Ctrl-C" (128 + SIGINT).
EXIT_INTERRUPTED = 130


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    threads = args.threads if args.threads is not None else DEFAULT_THREADS.get(args.command)
    keep_freed_memory()  # long runs reuse freed arrays instead of page-faulting fresh ones in
    try:
        with threadpool_limits(threads):  # None: leave the BLAS library's own choice
            args.func(args)
    except TrainingInterrupted as stop:
        print(f"\n{stop}. Continue with:\n  {resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside a training step: while loading, measuring, answering
        then = f". Continue with:\n  {resume_command(argv)}" if hasattr(args, "resume") else ""
        print(f"\nminift {args.command}: interrupted{then}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (TrainingError, FetchError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"minift {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder without write permission: the system's words, and the file
        print(f"minift {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    return 0


def os_error_message(exc: OSError) -> str:
    """What failed, on which file, and what to do; saves are atomic, so nothing older was lost."""
    where = f" while writing {exc.filename}" if exc.filename else ""
    advice = {errno.ENOSPC: "free some disk space or write elsewhere (--out)",
              errno.EACCES: "choose a folder you may write to (--out)"}.get(exc.errno, "check the path and retry")
    return f"{exc.strerror or exc}{where}; {advice}. Files saved before are intact (every save is atomic)"


if __name__ == "__main__":
    sys.exit(main())
