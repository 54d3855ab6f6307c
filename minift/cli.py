"""The ``minift`` command: demo, train, finetune, generate, eval, export.

    minift demo                                   the whole story on bundled data (minutes)
    minift train --data corpus.txt --out runs/tiny            pretrain a tiny model from scratch
    minift finetune --model runs/tiny --data qa.jsonl --method freeze --out runs/ft
    minift generate --model runs/ft "How do I file a claim?" [--chat]
    minift eval --model runs/ft --data held_out.txt           loss and perplexity

    minift fetch smollm2                          download SmolLM2-135M-Instruct (GGUF, 98 MB) once
    minift chat --model smollm2                   talk to it; --model also takes a .gguf or a folder
    minift finetune --model smollm2 --method lora --steps 20 --lr 1e-3 --out runs/smol-lora
    minift forgetting --model smollm2 --methods full,freeze,lora --steps 10 --out runs/forgetting

    minift serve --model runs/tiny --adapter legal=runs/a/adapter --slots 4 --port 8000   multi-LoRA HTTP
    minift bench-serve --requests 16 --adapters 4          tokens/s of concurrent multi-adapter requests

    minift memory --params 7e9                    lecture 003's memory table (full / LoRA / QLoRA), assumptions printed
    minift memory --model runs/tiny --method qlora --batch 4 --seq 64     predicted vs measured (tracemalloc)
    minift kernels check                          every CUDA kernel vs its NumPy reference (emulator, GPU)

    minift export --model runs/ft --format hf --out exports/ft             a Hugging Face folder (transformers, vLLM)
    minift export --model smollm2 --adapter runs/q/adapter --format gguf --dtype q8_0 --out smol.gguf   llama.cpp
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from threadpoolctl import threadpool_limits

from minift.allocator import keep_freed_memory
from minift.data import ByteTokenizer, DataLoader, InstructionDataset, TextDataset, bundled_path
from minift.io import save_model
from minift.io.hub import FetchError
from minift.nn import dequantize_model, trainable_report
from minift.peft import PeftModel
from minift.studies.memory import LEDGER_METHODS
from minift.training import TrainConfig, Trainer, TrainingError, TrainingInterrupted, evaluate_loss, perplexity
from minift.training.export import FORMATS, export_model, format_drift
from minift.training.methods import METHODS, MethodOptions, prepare_model
from minift.training.pretrained import base_model_reference, load_pretrained, save_pretrained


def _system_prompt(args, tok):
    """--system, else the model's own default (SmolLM2's template inserts one), so that training
    examples are rendered exactly as ``apply_chat_template`` renders a question at inference."""
    return args.system if args.system is not None else getattr(tok, "default_system_prompt", None)


def _train_config(args, out: Path) -> TrainConfig:
    return TrainConfig(max_steps=args.steps, lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
                       weight_decay=args.weight_decay, grad_accum_steps=args.grad_accum,
                       max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                       save_every=args.save_every, out_dir=str(out), seed=args.seed)


def _run(trainer: Trainer, resume: bool) -> None:
    if resume and trainer.resume():
        print(f"resumed from step {trainer.step}")
    trainer.train()


#: The demo's tiny model multiplies 128-wide matrices: too small to split across threads, and a
#: second BLAS thread that busy-waits makes every step ~10x slower whenever another program
#: keeps a core busy (measured: 0.28 s/step with 1 thread, 3.5 s/step with 2, one core taken).
DEFAULT_THREADS = {"demo": 1}


def cmd_demo(args) -> None:
    from minift.studies.demo import DemoSettings, run_demo  # noqa: PLC0415 - heavy imports only when used

    run_demo(args.out, DemoSettings.fast() if args.fast else DemoSettings())


def cmd_train(args) -> None:
    from minift.studies.demo import tiny_config  # noqa: PLC0415

    tok = ByteTokenizer()
    text = Path(args.data).read_text()
    loader = DataLoader(TextDataset(text, tok, args.block_size), args.batch_size, seed=args.seed, pad_id=tok.pad_id)
    from minift.models import LlamaForCausalLM  # noqa: PLC0415

    model = LlamaForCausalLM(tiny_config(tok.vocab_size), seed=args.seed)
    print(trainable_report(model))
    _run(Trainer(model, _train_config(args, Path(args.out)), loader), args.resume)
    save_model(model, args.out)
    print(f"model saved to {args.out}")


def cmd_finetune(args) -> None:
    model, tok = load_pretrained(args.model)
    system = _system_prompt(args, tok)
    options = MethodOptions(layers=args.layers, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            bottleneck=args.bottleneck, prefix_tokens=args.prefix_tokens, seed=args.seed)
    model, description = prepare_model(model, args.method, options)
    print(description)
    print(trainable_report(model))
    dataset = InstructionDataset(args.data, tok, model.config.max_seq_len, system_prompt=system)
    loader = DataLoader(dataset, args.batch_size, seed=args.seed, pad_id=tok.pad_id)
    eval_loader = None
    if args.eval_data:
        eval_set = InstructionDataset(args.eval_data, tok, model.config.max_seq_len, system_prompt=system)
        eval_loader = DataLoader(eval_set, args.batch_size, shuffle=False, pad_id=tok.pad_id)
    _run(Trainer(model, _train_config(args, Path(args.out)), loader, eval_loader), args.resume)
    if isinstance(model, PeftModel):
        # the base is named as PEFT needs it (hub id or absolute path), so the adapter folder stands alone
        model.peft_config[model.active_adapter].base_model_name_or_path = base_model_reference(args.model)
        model.save_pretrained(Path(args.out) / "adapter")
        print(f"LoRA adapter saved in PEFT format to {Path(args.out) / 'adapter'} (base: {args.model})")
        if not args.save_merged:
            return
        dequantize_model(model)  # QLoRA: merge into float weights (exact) and save those, not NF4
        model = model.merge_and_unload()
    surgery = {"method": args.method, **asdict(options)} if args.method in ("adapter", "prefix") else None
    save_pretrained(model, tok, args.out, surgery=surgery)
    print(f"model saved to {args.out}" + ("" if surgery else " as a Hugging Face folder"))


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


def _complete(model, tok, text: str, args, stop: bool) -> str:
    """Generate from ``text`` with the sampling flags; ``stop`` ends at the tokenizer's eos."""
    ids = tok.encode(text)
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {model.config.max_seq_len}")
    out = model.generate([ids], min(args.max_new_tokens, room), temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_id=tok.eos_id if stop else None, seed=args.seed)[0]
    return tok.decode(out.tolist(), skip_special=True)


def cmd_generate(args) -> None:
    model, tok = load_pretrained(args.model)
    text = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        text = tok.apply_chat_template(messages + [{"role": "user", "content": text}], add_generation_prompt=True)
    print(_complete(model, tok, text, args, stop=args.chat))


def cmd_chat(args) -> None:
    """An interactive conversation: the whole history is re-sent each turn (the model is stateless)."""
    model, tok = load_pretrained(args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("chat with the model: an empty line or Ctrl-D quits, /reset forgets the conversation")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(system + history, add_generation_prompt=True)
        reply = _complete(model, tok, prompt, args, stop=True).strip()
        print(f"model> {reply}")
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
    model, tok = load_pretrained(args.model)
    settings = ForgettingSettings(methods=methods, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  qa_questions=args.qa_questions, ppl_blocks=args.ppl_blocks, seed=args.seed)
    run_forgetting(model, tok, settings, args.out)


def cmd_eval(args) -> None:
    model, tok = load_pretrained(args.model)
    if args.data.endswith(".jsonl"):
        dataset = InstructionDataset(args.data, tok, model.config.max_seq_len, system_prompt=_system_prompt(args, tok))
    else:
        dataset = TextDataset(Path(args.data).read_text(), tok, args.block_size)
    loss = evaluate_loss(model, DataLoader(dataset, args.batch_size, shuffle=False, pad_id=tok.pad_id))
    print(f"loss {loss:.4f}  perplexity {perplexity(loss):.2f}")


def cmd_serve(args) -> None:
    from minift.serve.engine import build_engine  # noqa: PLC0415
    from minift.serve.server import CompletionServer, parse_adapter_specs  # noqa: PLC0415

    model, tok = load_pretrained(args.model)
    engine = build_engine(model, parse_adapter_specs(args.adapter), args.slots, args.max_batch, tok.eos_id)
    server = CompletionServer(engine, tok, port=args.port, window_ms=args.batch_window_ms, verbose=True)
    print(f"serving models {['base'] + [f'base:{n}' for n in engine.library.names()]} at "
          f"{server.url}/v1/completions (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")


def cmd_bench_serve(args) -> None:
    import tempfile  # noqa: PLC0415

    from minift.serve.engine import build_engine  # noqa: PLC0415
    from minift.serve.server import parse_adapter_specs  # noqa: PLC0415
    from minift.studies.serve_bench import run_bench_serve, synthetic_setup  # noqa: PLC0415

    if args.adapter and not args.model:
        raise ValueError("--adapter needs --model (without both, random adapters on a small model are used)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            (model, tok), adapters = load_pretrained(args.model), parse_adapter_specs(args.adapter)
        else:
            model, tok, adapters = synthetic_setup(tmp, args.adapters)
        engine = build_engine(model, adapters, args.slots, args.max_batch, tok.eos_id)
    r = run_bench_serve(engine, tok, args.requests, args.max_tokens)
    print(f"bench-serve: {r['requests']} concurrent requests over {r['adapters']} adapters, {args.slots} slots: "
          f"{r['completion_tokens']} tokens in {r['seconds']:.2f} s = {r['tokens_per_s']:.1f} tokens/s")
    cache = r["adapter_cache"]
    print(f"batches run: {r['batch_sizes']}; adapter cache: {cache['hits']} hits, {cache['misses']} misses, "
          f"{cache['evictions']} evictions, {cache['bytes_moved']} bytes moved")


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
        print(memory.format_projection(args.params, seq=args.seq or 2048, batch=args.batch))
        return
    model, _ = load_pretrained(args.model)
    print(memory.ledger(model, args.method, args.batch, args.seq or 64, MethodOptions(lora_r=args.lora_r)))


def _add_training_flags(p) -> None:
    p.add_argument("--out", required=True, help="folder for checkpoints, metrics, plots and the model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def _add_sampling_flags(p, max_new_tokens: int) -> None:
    """How generated tokens are chosen (``minift.models.generate``): greedy at temperature 0."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="LLM fine-tuning from scratch, in NumPy.")
    parser.add_argument("--threads", type=int, help="BLAS threads for matrix products (default: the BLAS "
                        "library's choice; 1 for the demo's tiny model)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain a tiny model, fine-tune it seven ways, compare")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pretrain a tiny byte-level model on a text file")
    p.add_argument("--data", required=True)
    p.add_argument("--block-size", type=int, default=128)
    _add_training_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a saved or pretrained model on instruction JSONL")
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--data", default=str(bundled_path("insurer_train.jsonl")),
                   help="instruction JSONL (default: the bundled insurer set)")
    p.add_argument("--eval-data")
    p.add_argument("--method", default="full", choices=METHODS)
    p.add_argument("--layers", type=int, help="blocks to freeze (freeze) or to train (last)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--bottleneck", type=int, default=16, help="adapter width (method adapter)")
    p.add_argument("--prefix-tokens", type=int, default=8, help="virtual tokens (method prefix)")
    p.add_argument("--system", help="system prompt added to every example")
    p.add_argument("--save-merged", action="store_true",
                   help="lora/qlora: also save the model with the adapter merged in, as a Hugging Face folder in --out")
    _add_training_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="write a model (an adapter merged in) as a Hugging Face folder or a GGUF file")
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or smollm2")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder to merge into the model first")
    p.add_argument("--adapter-base", choices=("nf4", "float"), help="merge into the dequantized NF4 base "
                   "(QLoRA; default when the adapter records it) or the original float weights")
    p.add_argument("--format", required=True, choices=tuple(FORMATS))
    p.add_argument("--out", required=True, help="the folder (hf) or .gguf file (gguf) to create")
    p.add_argument("--dtype", help="; ".join(f"{fmt}: {', '.join(dtypes)}" for fmt, dtypes in FORMATS.items())
                   + " (default f32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--system")
    _add_sampling_flags(p, max_new_tokens=100)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat with a model (e.g. --model smollm2)")
    p.add_argument("--model", required=True)
    p.add_argument("--system", help="system prompt (default: the model's own, if its template has one)")
    _add_sampling_flags(p, max_new_tokens=200)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("fetch", help="download a pretrained model into the cache ($MINIFT_CACHE)")
    p.add_argument("name", choices=["smollm2"])
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("forgetting", help="general QA accuracy and perplexity before/after each method")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default="full,freeze,lora", help="comma-separated, from: " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, help="one learning rate for all methods (default: per method)")
    p.add_argument("--qa-questions", type=int, default=40, help="general QA questions asked")
    p.add_argument("--ppl-blocks", type=int, default=16, help="128-token blocks of held-out text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/forgetting")
    p.set_defaults(func=cmd_forgetting)

    p = sub.add_parser("eval", help="loss and perplexity on a .txt or .jsonl file")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--system")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a model and its LoRA adapters over HTTP (OpenAI-style completions)")
    p.add_argument("--model", required=True)
    _add_serving_flags(p)
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--batch-window-ms", type=float, default=15.0, help="wait this long to batch requests together")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="tokens/s of concurrent multi-adapter requests to an in-process server")
    p.add_argument("--model", help="default: a small random model with --adapters random adapters")
    _add_serving_flags(p)
    p.add_argument("--adapters", type=int, default=4, help="random adapters when no --model is given")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("kernels", help="the CUDA kernels: 'check' runs each on every path against NumPy")
    p.add_argument("action", choices=["check"])
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("memory", help="the memory ledger: bytes of weights, gradients, optimizer, activations")
    p.add_argument("--params", type=float, help="project lecture 003's table to N parameters (e.g. 7e9)")
    p.add_argument("--model", help="predict and measure one training step of this model")
    p.add_argument("--method", default="lora", choices=LEDGER_METHODS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, help="tokens per row (default: 2048 with --params, 64 with --model)")
    p.add_argument("--lora-r", type=int, default=8)
    p.set_defaults(func=cmd_memory)
    return parser


def _add_serving_flags(p) -> None:
    p.add_argument("--adapter", action="append", metavar="NAME=FOLDER", help="a PEFT adapter folder; repeat")
    p.add_argument("--slots", type=int, default=4, help="adapters held in device slots at once (LRU)")
    p.add_argument("--max-batch", type=int, default=16, help="rows per batch at most")


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same one, with ``--resume``."""
    words = ["minift", *argv] + ([] if "--resume" in argv else ["--resume"])
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
    except (TrainingError, FetchError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"minift {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
